import dagster as dg
import pydantic
import torch

from beni_model.config import BeniConfig
from beni_model.recipe import Recipe, RecipeError, builtin_recipes, default_recipe, load_recipe
from beni_pipeline.defs.layout import DataLayout


class TrainingRecipe(dg.ConfigurableResource):
    """The recipe the graph builds for: `training_shards` measures samples with its model's tokenizer and image tokens,
    `trained_model` trains its stages. One setting for both, so the shards always fit the model that reads them."""

    name: str = pydantic.Field(
        default_factory=default_recipe,
        description=f"a built-in recipe ({', '.join(builtin_recipes())}) or the path of a recipe .yaml file; "
        "default smollm2-siglip on a GPU machine, tiny (the CPU demo's) otherwise",
    )

    def load(self) -> Recipe:
        try:
            recipe = load_recipe(self.name)
        except RecipeError as e:
            raise dg.Failure(str(e), allow_retries=False) from None
        if recipe.needs_gpu and not torch.cuda.is_available():
            raise dg.Failure(
                f"Recipe {self.name!r} needs a CUDA GPU and none is visible: run it on a GPU machine, or pick recipe 'tiny' to train on CPU.",
                allow_retries=False,
            )
        return recipe

    def beni_config(self, layout: DataLayout) -> BeniConfig:
        """The BeniConfig of the recipe's new model, its LLM built or converted offline first where the recipe names one."""
        return self.load().model_config_for(layout.model_parts)
