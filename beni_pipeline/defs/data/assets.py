import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Literal

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pydantic
import torch
from transformers import AutoTokenizer

from beni_model.data import image_text
from beni_pipeline.defs.config import Config
from beni_pipeline.defs.data.metadata import counts_table, length_histogram_md, preview_md, read_member, rows_md
from beni_pipeline.defs.engine import Engine
from beni_pipeline.defs.layout import DataLayout, split_partition_key
from beni_pipeline.defs.training.resources import TrainingRecipe
from beni_pipeline.prep.dedup import (
    DedupSettings,
    find_duplicates,
    find_duplicates_parallel,
    hash_chunks,
    kept_ids,
    sample_text,
    write_result,
)
from beni_pipeline.prep.download import DownloadSettings, download_chunk_file, read_index
from beni_pipeline.prep.files import write_parquet_atomic
from beni_pipeline.prep.fonts import corpus_fonts
from beni_pipeline.prep.ingest import IngestError, SourceSettings, build_manifest
from beni_pipeline.prep.locks import Busy
from beni_pipeline.prep.shard import ShardSettings, plan_shards, write_shards
from beni_pipeline.prep.synthetic import KINDS, OPTIONAL_KINDS, CorpusSettings, generate_corpus

manifest_chunks = dg.DynamicPartitionsDefinition(name="manifest_chunks")
GPU_CORPUS_SAMPLES = 120_000
GPU_CORPUS_PHOTOS = 0.5  # half the corpus photographed, half as drawn: the reader sees text both ways
# The CPU recipe trains for a few minutes: enough for a tiny model to start reading one line of digits, not every kind of
# the GPU corpus (bench/BENCHMARKS.md), so the CPU default corpus draws digit strings only.
CPU_CORPUS_KINDS = {"digits": 1.0}


class SourceManifestConfig(Config, SourceSettings):
    sources: list[str] = pydantic.Field(
        [], description="files or folders to read (parquet, csv, tsv, jsonl, LLaVA json, image folder); empty: the generated corpus"
    )
    corpus_samples: int = pydantic.Field(
        default_factory=lambda: GPU_CORPUS_SAMPLES if torch.cuda.is_available() else 2000,
        ge=1,
        description=f"size of the generated corpus; default {GPU_CORPUS_SAMPLES} on a GPU machine (the smollm2-siglip recipe's data), 2000 on CPU",
    )
    corpus_seed: int = pydantic.Field(0, description="seed of the generated corpus")
    corpus_kinds: dict[str, float] = pydantic.Field(
        default_factory=lambda: dict(KINDS) if torch.cuda.is_available() else dict(CPU_CORPUS_KINDS),
        description=f"kinds of samples the generated corpus draws, with their weights (of {sorted([*KINDS, *OPTIONAL_KINDS])}); default all but {list(OPTIONAL_KINDS)} on a GPU machine, "
        f"{sorted(CPU_CORPUS_KINDS)} on CPU",
    )
    corpus_fonts: Literal["train", "machine"] = pydantic.Field(
        "train",
        description="train: the train split of the fonts fetched at the fonts root ($BENI_FONTS, else <data>/fonts; the machine's own "
        "when none are fetched); machine: the machine's own fonts",
    )
    corpus_letter_spacing: bool = pydantic.Field(
        default_factory=torch.cuda.is_available,
        description="draw some one-line texts with letters spread apart or squeezed; default on a GPU machine, off on CPU",
    )
    corpus_photos: float = pydantic.Field(
        default_factory=lambda: GPU_CORPUS_PHOTOS if torch.cuda.is_available() else 0.0,
        ge=0,
        le=1,
        description="share of the generated samples photographed after drawing (perspective, uneven light, blur, noise, heavy JPEG); "
        f"default {GPU_CORPUS_PHOTOS} on a GPU machine, 0 on CPU",
    )


class DownloadConfig(Config, DownloadSettings):
    pass


@dg.asset(group_name="data", kinds={"parquet"}, owners=["team:data"])
def source_manifest(context: dg.AssetExecutionContext, config: SourceManifestConfig, layout: DataLayout) -> dg.MaterializeResult:
    """Every url+text row of the configured sources (or the generated rendered-text corpus), normalized
    into one parquet manifest with stable sample ids and cut into chunks: the partitions of `downloaded`."""
    if config.sources:
        sources = [Path(s).expanduser().resolve() for s in config.sources]
    else:
        fonts = corpus_fonts(layout.fonts) if config.corpus_fonts == "train" else ()
        drawn_with = f"{len(fonts)} train-split fonts at {layout.fonts}" if fonts else "the machine's own fonts"
        context.log.info(f"corpus fonts: {drawn_with}")
        corpus = CorpusSettings(
            samples=config.corpus_samples,
            seed=config.corpus_seed,
            kinds=config.corpus_kinds,
            fonts=fonts,
            letter_spacing=config.corpus_letter_spacing,
            photos=config.corpus_photos,
        )
        context.log.info(
            f"rendering the generated corpus of {corpus.samples} samples, {corpus.photos:.0%} photographed, into {layout.corpus} (kept when already complete)"
        )
        start = time.perf_counter()
        sources = [generate_corpus(layout.corpus, corpus)]
        context.log.info(f"corpus ready in {time.perf_counter() - start:.1f} s")
    _refuse_other_sources(layout, sources)
    try:
        manifest = build_manifest(sources, layout.manifest, config)
    except IngestError as e:
        raise dg.Failure(str(e), allow_retries=False) from None
    partitions = [layout.partition_key(chunk) for chunk in manifest.chunks]
    context.instance.add_dynamic_partitions(manifest_chunks.name, partitions)
    context.log.info(
        f"dataset {layout.dataset_name}: {manifest.table.num_rows} rows in {len(manifest.chunks)} chunks ({len(manifest.new_chunks)} new), "
        f"{sum(manifest.rejected.values())} rejected; partitions {partitions[0]}...{partitions[-1]}"
    )
    preview = manifest.table.slice(0, 10).select(["sample_id", "url", "caption", "chunk"]).to_pylist()
    return dg.MaterializeResult(
        metadata={
            "dataset": layout.dataset_name,
            "rows": manifest.table.num_rows,
            "rejected": sum(manifest.rejected.values()),
            "rejected_by_reason": counts_table(manifest.rejected, "reason"),
            "chunks": len(manifest.chunks),
            "new_chunks": len(manifest.new_chunks),
            "partition_range": f"{partitions[0]}...{partitions[-1]}",
            "sources": dg.MetadataValue.json([str(s) for s in sources]),
            "path": dg.MetadataValue.path(str(layout.manifest_parquet)),
            "preview": rows_md(preview),
        }
    )


@dg.asset(
    group_name="data",
    partitions_def=manifest_chunks,
    deps=[source_manifest],
    backfill_policy=dg.BackfillPolicy.single_run(),
    kinds={"httpx", "tar"},
    owners=["team:data"],
)
def downloaded(context: dg.AssetExecutionContext, config: DownloadConfig, layout: DataLayout, engine: Engine) -> dg.MaterializeResult:
    """Each manifest chunk fetched (http(s) from public addresses, local files inside their source's folder or image_root),
    validated, re-encoded and staged as tar parts with a parquet index that gives every row exactly one status: ok, or
    failed with its reason."""
    counts, fetched, seconds, bytes_in, previews = Counter(), 0, 0.0, 0, []
    keys, settings, chunks, out_dirs = context.partition_keys, DownloadSettings(**config.model_dump()), [], []
    for key in keys:
        # The key names its dataset, so a run over several datasets' chunks still writes each in its place.
        name, chunk_key = split_partition_key(key)
        dataset = layout.of_dataset(name)
        if not dataset.manifest_chunk(chunk_key).is_file():
            raise dg.Failure(
                f"Partition {key} has no manifest chunk at {dataset.manifest_chunk(chunk_key)}: materialize source_manifest for dataset "
                f"{name or '?'} first (with the same BENI_DATA); partitions look like {layout.partition_key('00000')}.",
                allow_retries=False,
            )
        chunks.append(dataset.manifest_chunk(chunk_key))
        out_dirs.append(dataset.download_dir(chunk_key))
    try:
        summaries = engine.map(download_chunk_file, chunks, out_dirs, [settings] * len(keys))
    except Busy as e:  # another run holds the chunk: retrying now would only wait again
        raise dg.Failure(str(e), allow_retries=False) from None
    for key, chunk_file, out_dir, summary in zip(keys, chunks, out_dirs, summaries):
        context.log.info(f"chunk {key}: {summary.fetched} fetched in {summary.seconds:.1f} s, {dict(summary.counts)}")
        counts.update(summary.counts)
        fetched, seconds, bytes_in = fetched + summary.fetched, seconds + summary.seconds, bytes_in + summary.bytes_in
        if len(previews) < 6:
            previews += _previews(pq.read_table(chunk_file), out_dir, 6 - len(previews))
    return dg.MaterializeResult(
        metadata={
            "partitions": len(context.partition_keys),
            "rows": sum(counts.values()),
            "ok": counts.get("ok", 0),
            "failed": sum(counts.values()) - counts.get("ok", 0),
            "counts_by_status": counts_table(counts),
            "fetched_this_run": fetched,
            "images_per_s": round(fetched / seconds, 1) if seconds else 0.0,
            "megabytes_downloaded": round(bytes_in / 1e6, 2),
            "path": dg.MetadataValue.path(str(layout.downloaded)),
            "preview": preview_md(previews) if previews else dg.MetadataValue.md("no images"),
        }
    )


def _previews(chunk, out_dir: Path, n: int) -> list[tuple[bytes, str]]:
    index = pq.read_table(out_dir / "index.parquet")
    ok = index.filter(pc.equal(index.column("status"), "ok")).slice(0, n).to_pylist()
    text = {r["sample_id"]: sample_text(r["caption"], r["conversations"]) for r in chunk.to_pylist()}
    return [(read_member(out_dir / r["tar"], r["offset"], r["size"]), text[r["sample_id"]]) for r in ok]


class DedupConfig(Config, DedupSettings):
    pass


class ShardConfig(Config):
    name: str = pydantic.Field("train", description="shard file names: <name>-000000.tar, ...")
    max_samples: int = pydantic.Field(
        500, ge=1, description="samples per shard at most: several shards even for small sets, so every rank reads its own"
    )
    max_bytes: int = pydantic.Field(256 * 2**20, ge=2**16, description="bytes per shard at most, tar headers included")


@dg.asset(group_name="data", deps=[downloaded], kinds={"datasketch", "parquet"}, owners=["team:data"])
def deduplicated(context: dg.AssetExecutionContext, config: DedupConfig, layout: DataLayout, engine: Engine) -> dg.MaterializeResult:
    """Near-duplicate clusters over every downloaded image (exact bytes, perceptual hash) and its text
    (MinHash); one sample per cluster is kept. Features are cached per chunk, so a rebuild hashes only new chunks."""
    chunks = _downloaded_chunks(layout)
    features = [layout.dedup_features(chunk) for chunk in chunks]
    start = time.perf_counter()

    def done(path: Path, rows: int, seconds: float) -> None:
        context.log.info(f"chunk {path.stem}: hashed {rows} rows ({rows / seconds:.0f} rows/s)")

    jobs = [(layout.manifest_chunk(c), layout.download_dir(c), f) for c, f in zip(chunks, features)]
    settings = DedupSettings(**config.model_dump())
    hashed = hash_chunks(jobs, settings, done, map_=engine.map if engine.on_ray else None)
    context.log.info(
        f"hashed {len(hashed)} of {len(chunks)} chunks ({len(chunks) - len(hashed)} cached) in {time.perf_counter() - start:.1f} s; clustering"
    )
    cluster_start = time.perf_counter()
    layout.dedup.mkdir(parents=True, exist_ok=True)
    if engine.on_ray:
        result = find_duplicates_parallel(features, settings, work_dir=layout.dedup, map_=engine.map)
    else:
        result = find_duplicates(features, settings, work_dir=layout.dedup)
    write_result(result, layout.dedup)
    kept = pa.concat_arrays([kept_ids(path, result) for path in features])
    write_parquet_atomic(pa.table({"sample_id": kept}), layout.kept)
    stats = result.stats()
    seconds = time.perf_counter() - start
    context.log.info(
        f"clustered {stats['rows']} samples in {time.perf_counter() - cluster_start:.1f} s: {stats['clusters']} clusters, {stats['dropped']} dropped"
    )
    return dg.MaterializeResult(
        metadata={
            "rows": stats["rows"],
            "kept": stats["kept"],
            "dropped": stats["dropped"],
            "duplicate_rate": round(stats["duplicate_rate"], 4),
            "clusters": stats["clusters"],
            "phash_key_bands": settings.key_bands(stats["rows"]),  # chosen by the corpus's size unless set
            "chunks_hashed_this_run": len(hashed),
            "samples_per_s": round(stats["rows"] / seconds, 1),
            # where the clustering's memory went: this process and each process that ran one of its jobs
            "clustering_peak_rss_mib": dg.MetadataValue.json(result.peak_rss_mib),
            "dropped_by_reason": counts_table(stats["dropped_by_reason"], "reason"),
            "cluster_sizes": counts_table(stats["cluster_size_histogram"], "size"),
            "clusters_preview": _clusters_md(layout, result.clusters.slice(0, 5).to_pylist()),
            "path": dg.MetadataValue.path(str(layout.dedup)),
        }
    )


@dg.asset(group_name="data", deps=[deduplicated], kinds={"webdataset"}, owners=["team:data"])
def training_shards(
    context: dg.AssetExecutionContext, config: ShardConfig, layout: DataLayout, recipe: TrainingRecipe, engine: Engine
) -> dg.MaterializeResult:
    """The kept samples as WebDataset tars sorted by token length (text tokens of the target LLM's tokenizer
    plus the image tokens), with index.json (per shard: count, lengths, bytes, sha256). Byte-identical for
    the same inputs; a killed run keeps its finished shards."""
    index = pa.concat_tables([read_index(layout.download_dir(chunk)) for chunk in _downloaded_chunks(layout)])
    manifest = pq.read_table(layout.manifest_parquet)
    kept = pq.read_table(_upstream(layout.kept, "deduplicated")).column("sample_id")
    if len(kept) == 0:  # an empty training set would only fail later, in the trainer, far from the cause
        failed = Counter(r["reason"] for r in index.select(["status", "reason"]).to_pylist() if r["status"] != "ok")
        raise dg.Failure(
            f"No sample to shard: none of the {index.num_rows} manifest rows downloaded (failures: "
            f"{', '.join(f'{reason} {n}' for reason, n in failed.most_common(3))}); fix the sources' URLs or the network "
            "and re-materialize downloaded.",
            allow_retries=False,
        )
    model = recipe.beni_config(layout)
    tokenizer = _tokenizer(model.text_model)
    settings = ShardSettings(**config.model_dump(), image_tokens=model.num_image_tokens())
    context.log.info(f"token lengths for recipe {recipe.name!r}: {model.text_model}'s tokenizer, {settings.image_tokens} tokens per image")
    start = time.perf_counter()
    plan = plan_shards(manifest, index, kept, tokenizer, settings, partial(image_text, model.extensions))
    seconds = time.perf_counter() - start
    context.log.info(f"measured the token length of {plan.num_rows} samples in {seconds:.1f} s ({plan.num_rows / seconds:.0f} samples/s)")
    start = time.perf_counter()
    shard_index = write_shards(plan, layout.downloaded, layout.shards, settings, map_=engine.map if engine.on_ray else None)
    shards = shard_index["shardlist"]
    megabytes = sum(s["bytes"] for s in shards) / 1e6
    context.log.info(f"{plan.num_rows} samples in {len(shards)} shards ({megabytes:.1f} MB) after {time.perf_counter() - start:.1f} s")
    lengths = plan.column("length").to_numpy()
    return dg.MaterializeResult(
        metadata={
            "samples": plan.num_rows,
            "shards": len(shards),
            "megabytes": round(megabytes, 2),
            "tokens": int(lengths.sum()),
            "length_min_mean_max": f"{lengths.min()} / {lengths.mean():.1f} / {lengths.max()}",
            "length_histogram": length_histogram_md(lengths),
            "shard_table": rows_md([{k: s[k] for k in ("url", "nsamples", "min_length", "max_length", "bytes")} for s in shards[:20]]),
            "index": dg.MetadataValue.path(str(layout.shards / "index.json")),
        }
    )


def _refuse_other_sources(layout: DataLayout, sources: list[Path]) -> None:
    """A dataset grows when its sources grow; sources that share nothing with its manifest are another dataset, and mixing
    them in would put both in one set of shards."""
    if not layout.manifest_parquet.is_file() or not all(s.exists() for s in sources):  # a missing source has its own sentence
        return
    before = set(pq.read_table(layout.manifest_parquet, columns=["source"]).column("source").to_pylist())
    if before and before.isdisjoint(str(s) for s in sources):
        raise dg.Failure(
            f"Dataset {layout.dataset_name!r} was built from {sorted(before)[0]}, not from these sources: name another dataset for them "
            "(`beni build --dataset NAME`, BENI_DATASET, or the layout resource's `dataset`), or delete "
            f"{layout.base} to start it over.",
            allow_retries=False,
        )


def _upstream(path: Path, asset: str) -> Path:
    if not path.exists():
        raise dg.Failure(f"{path} does not exist: materialize {asset} first (with the same BENI_DATA).", allow_retries=False)
    return path


def _tokenizer(name: str):
    try:
        return AutoTokenizer.from_pretrained(name)
    except OSError as e:
        raise dg.Failure(
            f"Cannot load the tokenizer {name!r} ({str(e).splitlines()[0]}): set `tokenizer` to a model folder or a hub id this machine can reach.",
            allow_retries=False,
        ) from None


def _downloaded_chunks(layout: DataLayout) -> list[str]:
    manifest = _upstream(layout.manifest_parquet, "source_manifest")
    chunks = sorted(set(pq.read_table(manifest, columns=["chunk"]).column("chunk").to_pylist()))
    missing = [c for c in chunks if not layout.download_index(c).exists()]
    if missing:
        raise dg.Failure(
            f"{len(missing)} manifest chunks of dataset {layout.dataset_name!r} are not downloaded yet (first: {missing[0]}); materialize "
            f"downloaded for partitions {layout.partition_key(chunks[0])}...{layout.partition_key(chunks[-1])} first.",
            allow_retries=False,
        )
    return chunks


def _clusters_md(layout: DataLayout, clusters: list[dict]) -> dg.MarkdownMetadataValue:
    """Each cluster's kept sample beside what was dropped as its duplicate, thumbnails and text."""
    if not clusters:
        return dg.MetadataValue.md("no duplicates")
    ids = {c["kept_id"] for c in clusters} | {d for c in clusters for d in c["dropped_ids"]}
    manifest = pq.read_table(layout.manifest_parquet)
    rows = {r["sample_id"]: r for r in manifest.filter(pc.is_in(manifest.column("sample_id"), pa.array(sorted(ids)))).to_pylist()}
    lines = []
    for cluster in clusters:
        lines.append(f"**cluster {cluster['cluster_id']}** ({', '.join(cluster['reasons'])})\n")
        samples = [cluster["kept_id"]] + list(cluster["dropped_ids"])
        images = [_image(layout, rows[s]) for s in samples]
        lines.append(
            preview_md(
                [
                    (
                        image,
                        ("KEPT: " if s == cluster["kept_id"] else "dropped: ") + sample_text(rows[s]["caption"], rows[s]["conversations"]),
                    )
                    for s, image in zip(samples, images)
                ]
            ).value
            + "\n"
        )
    return dg.MetadataValue.md("\n".join(lines) or "no duplicates")


def _image(layout: DataLayout, row: dict) -> bytes:
    index = read_index(layout.download_dir(row["chunk"]))
    (hit,) = index.filter(pc.equal(index.column("sample_id"), row["sample_id"])).to_pylist()
    return read_member(layout.download_dir(row["chunk"]) / hit["tar"], hit["offset"], hit["size"])
