import dagster as dg
import pydantic


class Config(dg.Config):
    """dg.Config whose invalid values fail the step with one sentence, not a pydantic traceback.

    Dagster's launchpad checks names and types before a run starts; ranges and the settings' own checks run when
    the step builds its config, which is where this turns them into a `Failure` the UI shows as is."""

    @pydantic.model_validator(mode="wrap")
    @classmethod
    def _fail_in_one_sentence(cls, values, handler):
        try:
            return handler(values)
        except pydantic.ValidationError as e:
            raise dg.Failure(f"Invalid config: {_problems(e)}; fix it in the launchpad or the run config.", allow_retries=False) from None


def _problems(error: pydantic.ValidationError) -> str:
    problems = []
    for e in error.errors():
        field = ".".join(map(str, e["loc"]))
        message = e["msg"].removeprefix("Value error, ")
        problems.append(f"{field}: {message} (got {e['input']!r})" if field else message)
    return "; ".join(problems)


def partition_range_tags(first: str, last: str) -> dict[str, str]:
    """Run tags that make one run cover the partitions first..last (a single-run backfill). These are the documented
    tag names that `dagster asset materialize --partition-range` sets; Dagster exports their constants only from its
    private modules."""
    return {"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last}
