"""Every recipe in configs/ loads into its typed recipe and task config; unknown keys fail with their name.

Recipes are found by globbing, so a recipe added later is checked without touching this file.
"""

from pathlib import Path

import pytest
import yaml
from conftest import REPO

from vlkit.errors import ConfigError
from vlkit.tasks import TASKS
from vlkit.training.recipe import Recipe, load_recipe, recipe_to_dict

RECIPES = sorted((REPO / "configs").rglob("*.yaml")) + sorted((REPO / "configs").rglob("*.yml"))


def _id(path: Path) -> str:
    return str(path.relative_to(REPO / "configs"))


def test_the_reference_and_demo_recipes_exist():
    names = {_id(p) for p in RECIPES}
    expected = {
        "blip2/pretrain_stage1.yaml",
        "blip2/retrieval_coco_ft.yaml",
        "shapes/stage1.yaml",
        "shapes/lm_opt.yaml",
        "shapes/lm_llama.yaml",
    }
    assert expected <= names


@pytest.mark.parametrize("path", RECIPES, ids=_id)
def test_recipe_loads(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe) and recipe.task_name in TASKS
    assert type(recipe.task).__name__ == TASKS[recipe.task_name].config
    # the resolved recipe round-trips through plain data
    assert recipe_to_dict(load_recipe(path)) == recipe_to_dict(recipe)


@pytest.mark.parametrize("path", RECIPES, ids=_id)
def test_unknown_keys_fail_with_their_name(path, tmp_path):
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    for section in ("task", "optim", "schedule", "run"):
        broken = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(broken.get(section), str):  # "task: NAME" short form
            broken[section] = {"name": broken[section]}
        broken.setdefault(section, {})["no_such_key"] = 1
        file = tmp_path / f"{section}.yaml"
        file.write_text(yaml.safe_dump(broken), encoding="utf-8")
        with pytest.raises(ConfigError, match=f"{section}.no_such_key"):
            load_recipe(file)
    assert data is not None
