from pathlib import Path

import pytest

from beni_model.recipe import RecipeError, builtin_recipes, load_recipe


@pytest.mark.parametrize("name", builtin_recipes())
def test_every_builtin_recipe_loads_and_names_each_stages_rates(name, tmp_path):
    recipe = load_recipe(name)
    configs = recipe.train_configs(tmp_path / "shards", tmp_path / "out", tmp_path / "parts")
    assert [Path(c.output_dir).name for c in configs] == [s.name for s in recipe.stages]
    for stage, config in zip(recipe.stages, configs):
        assert config.part_lr == stage.lr and config.train_parts == list(stage.lr)
        assert set(config.extensions) == set(recipe.model.extensions)
    assert configs[0].init_from is None and all(c.init_from == configs[i].output_dir + "/final" for i, c in enumerate(configs[1:]))


def test_lr_scale_and_overrides_change_every_stage_and_say_so(tmp_path):
    recipe = load_recipe("smollm2-siglip")
    plain = recipe.train_configs(tmp_path, tmp_path, tmp_path / "parts")
    scaled = recipe.train_configs(tmp_path, tmp_path, tmp_path / "parts", lr_scale=0.5, max_steps=7)
    for a, b in zip(plain, scaled):
        assert b.max_steps == 7 and b.part_lr == {part: rate / 2 for part, rate in a.part_lr.items()}
    assert [c.augment for c in recipe.train_configs(tmp_path, tmp_path, tmp_path / "parts", augment=["glyphs"])] == [["glyphs"]] * 2
    assert recipe.train_configs(tmp_path, tmp_path, tmp_path / "parts", augment=True)[0].augment == ["camera", "glyphs"]
    with pytest.raises(ValueError, match="augment"):  # an override is checked as the recipe's file is
        recipe.train_configs(tmp_path, tmp_path, tmp_path / "parts", augment=["colour"])


@pytest.mark.parametrize(
    "stage,problem",
    [
        (
            "{name: enc, kind: encoder, lr: {vision_tower: 1.0e-3}, max_steps: 10, bach_size: 4}",
            "stages.0.bach_size: Extra inputs are not permitted",
        ),
        (
            "{name: enc, kind: encoder, lr: {connector: 1.0e-3}, max_steps: 10}",
            "trains ['vision_tower'] alone: its lr must name exactly that",
        ),
        ("{name: ft, lr: {}, max_steps: 10}", "lr names no part"),
    ],
)
def test_a_users_recipe_file_is_checked_in_one_sentence(tmp_path, stage, problem):
    path = tmp_path / "mine.yaml"
    path.write_text(
        f"name: mine\nmodel: {{text_model: tiny-llama, vision_config: {{model_type: siglip_vision_model}}}}\nstages:\n  - {stage}\n"
    )
    with pytest.raises(RecipeError) as error:
        load_recipe(str(path))
    assert str(error.value).startswith(f"Recipe {path} is invalid: ") and problem in str(error.value)


def test_an_unknown_recipe_names_the_known_ones():
    with pytest.raises(RecipeError, match=r"Unknown recipe 'huge': pick one of \['smollm2-siglip', 'tiny'\]"):
        load_recipe("huge")
