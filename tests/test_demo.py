"""``vlkit demo``: the showcase, the evaluation table against random initialisation, the grid, the pipeline's
plumbing; and the floors of the bundled shapes models (issue [demo])."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlkit import cli, demo
from vlkit.checkpoints.folder import load_checkpoint, read_config
from vlkit.commands.demo import RESULTS_BEGIN, RESULTS_END, _write_results
from vlkit.errors import ConfigError, VlkitError


def test_random_init_copy_keeps_config_and_files_but_not_weights(tiny_model_dirs, tmp_path):
    source = tiny_model_dirs["blip2"]
    copy = demo.random_init_copy(source, tmp_path / "random", seed=3)
    assert read_config(copy) == read_config(source)
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == sorted(
        p.relative_to(source) for p in source.rglob("*")
    )
    trained = load_checkpoint(source).model.state_dict()
    random = load_checkpoint(copy).model.state_dict()
    assert trained.keys() == random.keys()
    matrices = [k for k in trained if trained[k].ndim >= 2]
    assert matrices and all(not torch.equal(trained[k], random[k]) for k in matrices)
    again = load_checkpoint(demo.random_init_copy(source, tmp_path / "again", seed=3)).model.state_dict()
    assert all(torch.equal(random[k], again[k]) for k in random)  # seeded: the baseline is reproducible


def test_ensure_world_reuses_a_large_enough_world(tmp_path):
    world = demo.ensure_world(tmp_path / "w", test_images=3)
    stamp = (world / "manifest.json").stat().st_mtime_ns
    assert demo.ensure_world(world, test_images=2).samefile(world)
    assert (world / "manifest.json").stat().st_mtime_ns == stamp
    demo.ensure_world(world, test_images=5)
    assert json.loads((world / "manifest.json").read_text())["splits"]["test"]["images"] == 5


def test_test_split_does_not_depend_on_the_train_size(tmp_path):
    a = demo.ensure_world(tmp_path / "a", test_images=3, train_images=1)
    b = demo.ensure_world(tmp_path / "b", test_images=3, train_images=4)
    # Image ids count on from the train split; the scenes, texts and pixels do not depend on it.
    qa = [json.loads((w / "vqa/v2_OpenEnded_shapes_test_questions.json").read_text())["questions"] for w in (a, b)]
    assert [q["question"] for q in qa[0]] == [q["question"] for q in qa[1]]
    caps = [json.loads((w / "annotations/coco_karpathy_test.json").read_text()) for w in (a, b)]
    assert [c["caption"] for c in caps[0]] == [c["caption"] for c in caps[1]]
    pixels = [[p.read_bytes() for p in sorted((w / "images" / "test").glob("*.png"))] for w in (a, b)]
    assert pixels[0] and pixels[0] == pixels[1]


def test_table_and_floors():
    scores = demo.Scores({c.label: c.floor + 1 for c in demo.CHECKS})
    assert demo.failed_floors(scores) == []
    low = demo.Scores({**scores.values, "caption CIDEr": 0.5, "VLMo VQA accuracy (%)": None})
    failed = demo.failed_floors(low)
    assert len(failed) == 2 and failed[0].startswith("caption CIDEr: 0.5 < 1.2")
    guards = demo.Scores({c.label: c.guard for c in demo.CHECKS})
    assert demo.failed_floors(guards, bound="guard") == []
    table = demo.format_scores({"trained": scores, "random init": low})
    assert "caption CIDEr" in table and "0.500" in table and ">= 1.2" in table
    rows = table.splitlines()
    assert len(rows) == 2 + len(demo.CHECKS)
    md = demo.results_markdown({"retrained": scores}, {"stage1": 12.3}, test_images=7)
    assert "| caption CIDEr | 2.200 | 1.2 |" in md and "stage1 12" in md


def test_results_block_is_replaced_not_appended(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# recipes\n\nintro\n")
    _write_results(readme, "| a | 1 |\n")
    _write_results(readme, "| a | 2 |\n")
    text = readme.read_text()
    assert text.count(RESULTS_BEGIN) == 1 and text.count(RESULTS_END) == 1
    assert "| a | 2 |" in text and "| a | 1 |" not in text and text.startswith("# recipes\n\nintro\n")


def test_demo_on_tiny_models(tiny_model_dirs, tmp_path):
    """The whole demo path on tiny random models: showcase, table (with the random-init column), grid, JSON."""
    models = {role: tiny_model_dirs[role] for role in ("blip2", "instructblip", "vlmo")}
    lines: list[str] = []
    checks = [c for c in demo.CHECKS if c.task != "caption"]  # captioning junk to 30 tokens is the slow part
    columns = demo.run_demo(
        out=tmp_path / "demo", models=models, test_images=3, checks=checks, echo=lines.append, showcase_images=2
    )
    text = "\n".join(lines)
    for needle in ("Captions", "Questions", "Zero-shot classification", "retrieval", "random init", "floor"):
        assert needle in text
    assert set(columns) == {"trained", "random init"}
    for check in checks:
        value = columns["trained"].values[check.label]
        assert value is not None and 0.0 <= value <= 100.0
    doc = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert set(doc["columns"]) == {"trained", "random init"}
    with Image.open(tmp_path / "demo" / "grid.png") as grid:
        assert grid.width > 2 * 64 and grid.height > 64


def test_command_errors():
    with pytest.raises(VlkitError, match="--quick goes with --retrain"):
        cli_main(["demo", "--quick"])
    with pytest.raises(ConfigError, match="--test-images"):
        cli_main(["demo", "--test-images", "0"])
    with pytest.raises(ConfigError, match="missing shapes recipes"):
        demo.retrain(Path("/nonexistent"), recipes=Path("/nonexistent"))


def cli_main(argv: list[str]) -> int:
    from vlkit.cli import COMMANDS

    assert "demo" in COMMANDS
    module = __import__(COMMANDS[argv[0]].module, fromlist=["main"])
    return module.main(argv[1:])


def test_demo_is_a_command():
    assert cli.COMMANDS["demo"].module == "vlkit.commands.demo"


# ----------------------------------------------------------------------------------------------------------
# The bundled models and the pipeline
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bundled_models_reach_the_floors(tmp_path):
    """Issues [demo] and [vlmo]: the bundled models, evaluated on the fixed shapes test split, keep every guard
    (the floor itself where they reach it; see :class:`vlkit.demo.Check`)."""
    folders = {role: demo.model_folder(name) for role, name in demo.MODELS.items()}
    world = demo.ensure_world(tmp_path / "shapes", test_images=demo.DEMO_TEST_IMAGES)
    scores = demo.evaluate_models(folders, world, out=tmp_path / "eval")
    print(demo.format_scores({"bundled": scores}))
    assert demo.failed_floors(scores, bound="guard") == []
    for check in demo.CHECKS:  # a guard below its floor is an open target, never a lowered one
        assert check.guard <= check.floor
        if check.guard < check.floor:
            print(f"open target: {check.label} reaches {scores.values[check.label]:.3g}, floor {check.floor:g}")


def test_pipeline_stages_fit_together():
    """Every stage trains on (or makes) a known world, waits only for earlier stages, and a recipe on a world
    other than the main one waits for the stage that makes it."""
    names = [stage.name for stage in demo.STAGES]
    assert len(set(names)) == len(names) and set(demo.ROLE_RUNS.values()) <= set(names)
    for i, stage in enumerate(demo.STAGES):
        assert stage.world in demo.WORLDS, stage
        assert set(stage.after) <= set(names[:i]), stage
        makers = [s.name for s in demo.STAGES if s.recipe is None and s.world == stage.world]
        if stage.recipe is None:
            assert stage.world != "data" and makers == [stage.name]  # the main world is made before any stage
        elif stage.world != "data":
            assert set(makers) <= set(stage.after), stage


@pytest.mark.slow
def test_reduced_pipeline_end_to_end(tmp_path):
    """CI's run of ``vlkit demo --retrain OUT --quick``: every recipe of configs/shapes trains a few steps from
    the previous stage's export, and the exported models load and are evaluated."""
    made = demo.retrain(tmp_path / "pipeline", quick=True, echo=lambda line: None)
    assert set(made.models) == set(demo.MODELS)
    for stage in demo.STAGES:  # vlkit folders (config.yaml) or, for the LMs, transformers folders (config.json)
        assert (tmp_path / "pipeline" / "runs" / f"{stage.name}.log").is_file()
        if stage.recipe is None:  # a stage that makes another world
            manifest = json.loads((tmp_path / "pipeline" / stage.world / "manifest.json").read_text())
            assert manifest["splits"]["train"]["images"] == demo.QUICK_TRAIN_IMAGES
            continue
        model = tmp_path / "pipeline" / "runs" / stage.name / "model"
        assert (model / "config.yaml").is_file() or (model / "config.json").is_file(), stage.name
    assert set(made.seconds) >= {stage.name for stage in demo.STAGES} | {"data", "tokenizers", "total"}
    scores = demo.evaluate_models(made.models, tmp_path / "pipeline" / "data", out=tmp_path / "eval")
    assert all(value is not None for value in scores.values.values())
