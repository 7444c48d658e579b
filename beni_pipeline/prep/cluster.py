"""Run the data steps' jobs as tasks on a Ray cluster: the very functions the local path calls, each where a node
has a CPU free.

Jobs pass paths, never data: every node must see the data root at the same path (a shared filesystem) and have beni
installed. A task whose node dies is run again elsewhere (`retries`); an exception a job raises is not retried
and reaches the caller as itself, so its one sentence (a busy chunk, a bad file) stays the message."""

from collections.abc import Callable


def ray_map(function: Callable, *args, num_cpus: float = 1, retries: int = 3) -> list:
    """[function(*a) for a in zip(*args)], each call a Ray task of `num_cpus`; results in order."""
    import ray

    task = ray.remote(function).options(num_cpus=num_cpus, max_retries=retries, retry_exceptions=False)
    refs = [task.remote(*a) for a in zip(*args)]
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        for ref in refs:
            ray.cancel(ref)
        raise e.cause from None
