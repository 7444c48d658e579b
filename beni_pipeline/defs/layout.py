"""DataLayout: the one owner of the paths under the data root. Assets, checks, the CLI and the benchmarks ask it."""

import os
import re
from pathlib import Path

import dagster as dg
import pydantic

DEFAULT_DATASET = "demo"
DATASET_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def split_partition_key(key: str) -> tuple[str, str]:
    """(dataset, chunk) of a partition key of `downloaded`."""
    dataset, _, chunk = key.rpartition("/")
    return dataset, chunk


class DataLayout(dg.ConfigurableResource):
    """Where every asset keeps its files under one data root.

    Data passes between assets as files at these paths; nothing else spells them out, so moving a folder is a change
    here alone."""

    root: str = pydantic.Field("", description="the data root; empty: $BENI_DATA, else ./data")
    dataset: str = pydantic.Field(
        "", description=f"the dataset's folder under the data root; empty: $BENI_DATASET, else {DEFAULT_DATASET!r} (the generated corpus)"
    )

    @property
    def data_root(self) -> Path:
        return Path(self.root or os.environ.get("BENI_DATA", "data")).resolve()

    @property
    def dataset_name(self) -> str:
        """The dataset's name: each dataset has its own folder and its own partition keys, so datasets never mix."""
        name = self.dataset or os.environ.get("BENI_DATASET", "") or DEFAULT_DATASET
        if not DATASET_NAME.fullmatch(name):
            raise dg.Failure(
                f"Dataset name {name!r} is not a plain folder name: use letters, digits, '_', '-' or '.'.", allow_retries=False
            )
        return name

    @property
    def base(self) -> Path:
        """Everything made from one dataset, its trained models and their reports included."""
        return self.data_root / "datasets" / self.dataset_name

    def of_dataset(self, name: str) -> "DataLayout":
        return DataLayout(root=self.root, dataset=name)

    # partitions of `downloaded`: one per manifest chunk, named <dataset>/<chunk> so that the chunks of every dataset
    # share one partitions definition (the asset graph is static) and a partition names its folder.
    def partition_key(self, chunk: str) -> str:
        return f"{self.dataset_name}/{chunk}"

    def partition_keys(self) -> list[str]:
        """The partitions of this dataset's manifest chunks, in order; empty before source_manifest ran."""
        return [self.partition_key(path.stem) for path in sorted(self.manifest_chunks.glob("*.parquet"))]

    # data
    @property
    def fonts(self) -> Path:
        """Fetched fonts by Debian package (prep/fonts.py): $BENI_FONTS, else the data root's fonts/."""
        return Path(os.environ.get("BENI_FONTS") or self.data_root / "fonts").resolve()

    @property
    def corpus(self) -> Path:
        """The generated rendered-text corpus (the default source)."""
        return self.base / "corpus"

    @property
    def corpus_jsonl(self) -> Path:
        return self.corpus / "corpus.jsonl"

    @property
    def manifest(self) -> Path:
        """manifest.parquet, chunks/<key>.parquet, rejected.parquet."""
        return self.base / "manifest"

    @property
    def manifest_parquet(self) -> Path:
        return self.manifest / "manifest.parquet"

    @property
    def manifest_chunks(self) -> Path:
        return self.manifest / "chunks"

    def manifest_chunk(self, chunk: str) -> Path:
        """One chunk's manifest rows: the input of one partition of `downloaded`."""
        return self.manifest_chunks / f"{chunk}.parquet"

    @property
    def downloaded(self) -> Path:
        return self.base / "downloaded"

    def download_dir(self, chunk: str) -> Path:
        return self.downloaded / chunk

    def download_index(self, chunk: str) -> Path:
        return self.download_dir(chunk) / "index.parquet"

    def download_indexes(self) -> list[Path]:
        """The index of every chunk downloaded so far."""
        return sorted(self.downloaded.glob("*/index.parquet"))

    @property
    def dedup(self) -> Path:
        """kept.parquet, duplicates.parquet, clusters.parquet and features/<chunk>.parquet."""
        return self.base / "dedup"

    def dedup_features(self, chunk: str) -> Path:
        return self.dedup / "features" / f"{chunk}.parquet"

    @property
    def kept(self) -> Path:
        return self.dedup / "kept.parquet"

    @property
    def duplicates(self) -> Path:
        return self.dedup / "duplicates.parquet"

    @property
    def shards(self) -> Path:
        return self.base / "shards"

    # training
    def training(self, recipe: str) -> Path:
        """One folder per stage of the recipe, with the stage's config beside it."""
        return self.base / "training" / recipe

    @property
    def model_parts(self) -> Path:
        """Parts the recipes build offline once (e.g. the tiny LLM), shared by every recipe and every dataset."""
        return self.data_root / "parts"

    @property
    def final_model(self) -> Path:
        """The save_pretrained folder of the latest trained model: what `trained_model` publishes, the rest reads."""
        return self.base / "model" / "final"

    # evaluation and export
    @property
    def heldout(self) -> Path:
        """The held-out generated OCRBench-format set (ocr_eval.json and its images)."""
        return self.base / "heldout"

    @property
    def eval_set(self) -> Path:
        """Which set `heldout_eval_set` made: {"name", "json", "images"} (the generated set, or the real OCRBench)."""
        return self.heldout / "eval_set.json"

    @property
    def heldout_unseen(self) -> Path:
        """The unseen-renderer set (prep/unseen_eval.py): fonts, layouts and camera the corpus never uses."""
        return self.base / "heldout_unseen"

    @property
    def unseen_eval_set(self) -> Path:
        """{"name", "json", "images"} of the unseen-renderer set, when `heldout_eval_set` made one."""
        return self.heldout_unseen / "eval_set.json"

    @property
    def heldout_unseen_no_camera(self) -> Path:
        """The unseen-renderer set's items as drawn, before its camera (the same questions; only the photo effects gone)."""
        return self.base / "heldout_unseen_no_camera"

    @property
    def unseen_no_camera_eval_set(self) -> Path:
        return self.heldout_unseen_no_camera / "eval_set.json"

    @property
    def ocr_eval(self) -> Path:
        return self.base / "ocr_eval" / "report"

    @property
    def ocr_eval_unseen(self) -> Path:
        """The report on the unseen-renderer set."""
        return self.base / "ocr_eval" / "unseen"

    @property
    def ocr_eval_unseen_no_camera(self) -> Path:
        return self.base / "ocr_eval" / "unseen_no_camera"

    @property
    def comparison(self) -> Path:
        """comparison.json and .md: both sets and Tesseract side by side, per category."""
        return self.base / "ocr_eval" / "comparison"

    @property
    def tesseract_scores(self) -> Path:
        """{set fingerprint: Tesseract's summary} (prep/tesseract.py); put one made on another machine here."""
        return self.base / "ocr_eval" / "tesseract.json"

    @property
    def exports(self) -> Path:
        return self.base / "exports"
