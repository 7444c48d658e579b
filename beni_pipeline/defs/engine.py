"""Engine: where the data assets run their per-chunk, per-bucket and per-shard jobs."""

import os
from collections.abc import Callable

import dagster as dg
import pydantic
from pydantic import PrivateAttr

from beni_pipeline.prep.cluster import ray_map

ENGINES = ("local", "ray")


class Engine(dg.ConfigurableResource):
    """`local`: this machine's processes (the default). `ray`: tasks on a Ray cluster, joined when a run starts.

    One resource for the UI, the CLI and the tests: set it in the code location, or through $BENI_ENGINE and
    $BENI_RAY_ADDRESS, as the data root is set through $BENI_DATA."""

    kind: str = pydantic.Field("", description=f"one of {', '.join(ENGINES)}; empty: $BENI_ENGINE, else local")
    address: str = pydantic.Field(
        "",
        description="the Ray cluster to join (auto, host:6379, ray://host:10001); empty: $BENI_RAY_ADDRESS, else $RAY_ADDRESS, "
        "else an ephemeral cluster on this machine for the run",
    )
    _joined: bool = PrivateAttr(False)

    @property
    def name(self) -> str:
        name = self.kind or os.environ.get("BENI_ENGINE", "") or "local"
        if name not in ENGINES:
            raise dg.Failure(
                f"Unknown engine {name!r}: set the engine resource's kind (or $BENI_ENGINE) to local or ray.", allow_retries=False
            )
        return name

    @property
    def on_ray(self) -> bool:
        return self.name == "ray"

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        if not self.on_ray:
            return
        try:
            import ray
        except ImportError:
            raise dg.Failure(
                "The ray engine needs Ray: pip install 'beni[ray]', or set the engine to local.", allow_retries=False
            ) from None
        if ray.is_initialized():
            return
        address = self.address or os.environ.get("BENI_RAY_ADDRESS") or None
        try:
            if address or os.environ.get("RAY_ADDRESS"):
                ray.init(address=address, log_to_driver=False)
            else:  # a cluster of this machine alone, for this run: on the loopback, without the dashboard
                ray.init(log_to_driver=False, include_dashboard=False, _node_ip_address="127.0.0.1")
        except ConnectionError as e:
            raise dg.Failure(
                f"Cannot join the Ray cluster at {address or os.environ.get('RAY_ADDRESS')} ({e}): start it (ray start --head) or fix the engine's address.",
                allow_retries=False,
            ) from None
        self._joined = True  # workers log on their node; the run's log gets the jobs' results and errors
        context.log.info(f"engine ray: {ray.cluster_resources().get('CPU', 0):g} CPUs on {len(ray.nodes())} nodes")

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._joined:  # a run that found Ray already joined (a test, a notebook) leaves it so
            import ray

            ray.shutdown()

    def map(self, function: Callable, *args) -> list:
        """[function(*a) for a in zip(*args)]: here one after another, or as Ray tasks in parallel."""
        return ray_map(function, *args) if self.on_ray else list(map(function, *args))
