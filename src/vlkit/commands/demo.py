"""``vlkit demo``: the bundled shapes models at work, evaluated against random initialisation.

Examples::

    vlkit demo                                  # captions, answers, classification, retrieval, the table, grid.png
    vlkit demo --out /tmp/demo --test-images 200
    vlkit demo --retrain runs/shapes            # the whole pipeline from scratch (26-29 min on 2 CPU cores)
    vlkit demo --retrain /tmp/quick --quick     # the reduced pipeline (a few steps per stage; CI)
    vlkit demo --retrain runs/shapes --install  # maintainers: bundle the models, rewrite configs/shapes/README
"""

from __future__ import annotations

import time
from pathlib import Path

from vlkit.commands import common
from vlkit.errors import CheckpointError, ConfigError


def main(argv: list[str]) -> int:
    from vlkit import demo

    p = common.ArgumentParser(
        prog="vlkit demo", description=__doc__, formatter_class=common.argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--out", default="vlkit-demo", help="demo folder: test world, evaluations, grid.png (default vlkit-demo)"
    )
    p.add_argument(
        "--test-images", type=int, default=demo.DEMO_TEST_IMAGES, metavar="N", help="images in the test split"
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    p.add_argument("--no-baseline", action="store_true", help="skip the random-init column")
    p.add_argument("--retrain", metavar="OUT", help="train every model from scratch into OUT, then evaluate them")
    p.add_argument("--quick", action="store_true", help="--retrain: the reduced pipeline (a few steps per stage)")
    p.add_argument("--recipes", metavar="DIR", help="--retrain: the shapes recipes (default: configs/shapes)")
    p.add_argument("--train-images", type=int, metavar="N", help="--retrain: train images of the main world")
    p.add_argument("--jobs", type=int, default=2, metavar="N", help="--retrain: stages trained at once (default 2)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="--retrain: recipe override for every stage",
    )
    p.add_argument(
        "--install",
        action="store_true",
        help="--retrain: copy the models into the package and rewrite configs/shapes/README.md",
    )
    args = p.parse_args(argv)
    if args.test_images < 1:
        raise ConfigError(f"--test-images must be >= 1, got {args.test_images}")
    for flag in ("quick", "recipes", "train_images", "install"):
        if getattr(args, flag) and args.retrain is None:
            raise ConfigError(f"--{flag.replace('_', '-')} goes with --retrain OUT")
    if args.overrides and args.retrain is None:
        raise ConfigError("--set goes with --retrain OUT")
    if args.install and args.quick:
        raise ConfigError("--install bundles fully trained models; it does not go with --quick")

    if args.retrain is None:
        demo.run_demo(
            out=Path(args.out), test_images=args.test_images, device=args.device, baseline=not args.no_baseline
        )
        return 0

    start = time.perf_counter()
    made = demo.retrain(
        Path(args.retrain),
        recipes=Path(args.recipes) if args.recipes else None,
        quick=args.quick,
        train_images=args.train_images,
        extra_overrides=args.overrides,
        jobs=args.jobs,
    )
    print(
        f"pipeline trained in {time.perf_counter() - start:.0f} s: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in made.seconds.items())
    )
    bundled = {}
    if not args.quick:
        try:
            bundled = {"bundled": {role: demo.model_folder(name) for role, name in demo.MODELS.items()}}
        except CheckpointError:  # a checkout without bundled weights still shows the retrained models
            bundled = {}
    columns = demo.run_demo(
        out=Path(args.retrain) / "demo",
        models=made.models,
        test_images=args.test_images,
        device=args.device,
        baseline=not args.no_baseline,
        extra_columns=bundled,
    )
    failed = demo.failed_floors(columns["trained"])
    if failed and not args.quick:
        print("below the floors: " + "; ".join(failed))
    if args.install:
        sizes = demo.install_bundle(made.models)
        readme = demo.recipes_dir() / "README.md"
        table = demo.results_markdown(
            {
                "retrained": columns["trained"],
                **({"random init": columns["random init"]} if "random init" in columns else {}),
            },
            made.seconds,
            test_images=args.test_images,
        )
        _write_results(readme, table)
        print(
            "installed "
            + ", ".join(f"{name} ({size / 1e6:.1f} MB)" for name, size in sizes.items())
            + f"; updated {readme}"
        )
    return 0


RESULTS_BEGIN = "<!-- results: written by vlkit demo --retrain OUT --install -->"
RESULTS_END = "<!-- end of results -->"


def _write_results(readme: Path, table: str) -> None:
    """Replace the results block of ``readme`` (or append one)."""
    text = readme.read_text(encoding="utf-8") if readme.is_file() else "# Shapes-world recipes\n"
    block = f"{RESULTS_BEGIN}\n{table}{RESULTS_END}\n"
    if RESULTS_BEGIN in text and RESULTS_END in text:
        head, rest = text.split(RESULTS_BEGIN, 1)
        tail = rest.split(RESULTS_END, 1)[1].lstrip("\n")
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block
    readme.write_text(text, encoding="utf-8")
