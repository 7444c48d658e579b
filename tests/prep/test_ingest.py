import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from beni_pipeline.prep.ingest import IngestError, SourceSettings, build_manifest, read_source

ROWS = [
    {"url": "images/a.jpg", "caption": "a red sign that says STOP"},
    {"url": "http://127.0.0.1:1/b.jpg", "caption": "a receipt, total 12.50"},
    {"url": "images/c.jpg", "caption": "handwritten note"},
]


def write_all_formats(folder):
    (folder / "images").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(ROWS), folder / "rows.parquet")
    with open(folder / "rows.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["url", "caption"])
        writer.writeheader()
        writer.writerows(ROWS)
    with open(folder / "rows.tsv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["url", "caption"], delimiter="\t")
        writer.writeheader()
        writer.writerows(ROWS)
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))


def ids(rows):
    return [r["sample_id"] for r in rows]


def test_tabular_formats_agree(tmp_path):
    write_all_formats(tmp_path)
    results = {name: read_source(tmp_path / name, SourceSettings()) for name in ["rows.parquet", "rows.csv", "rows.tsv", "rows.jsonl"]}
    first = results["rows.parquet"][0]
    assert len(first) == 3 and len(set(ids(first))) == 3
    for good, bad in results.values():
        assert ids(good) == ids(first) and bad == []
    assert first[0]["url"] == str((tmp_path / "images/a.jpg").resolve())
    assert first[1]["url"] == "http://127.0.0.1:1/b.jpg"


def test_llava_json_and_image_folder(tmp_path):
    conversations = [{"from": "human", "value": "<image>\nWhat is written?"}, {"from": "gpt", "value": "STOP"}]
    llava = [{"id": "1", "image": "x.jpg", "conversations": conversations}, {"id": "2", "conversations": conversations}]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    good, bad = read_source(tmp_path / "llava.json", SourceSettings(image_root="/data/coco"))
    assert good[0]["url"] == "/data/coco/x.jpg" and json.loads(good[0]["conversations"]) == conversations
    assert [b["reason"] for b in bad] == ["missing_url"]  # a text-only item has no image to fetch

    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ["a.jpg", "b.png", "c.jpg"]:
        (folder / name).write_bytes(b"")
    (folder / "a.txt").write_text("a caption")
    (folder / "b.json").write_text(json.dumps({"conversations": conversations}))
    good, bad = read_source(folder, SourceSettings())
    assert [g["caption"] for g in good] == ["a caption", ""] and good[1]["conversations"]
    assert [(b["row"], b["reason"]) for b in bad] == [(3, "missing_text")]


def test_unusable_rows_are_counted_with_a_reason(tmp_path):
    rows = [
        {"url": "a.jpg", "caption": "ok"},
        {"url": "", "caption": "no url"},
        {"url": "b.jpg", "caption": ""},
        {"url": "c.jpg", "conversations": "[{\"from\": \"robot\", \"value\": \"hi\"}]"},
        {"url": "d.jpg", "conversations": "{not json"},
        {"url": "a.jpg", "caption": "ok"},
    ]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = build_manifest([tmp_path / "rows.jsonl"], tmp_path / "manifest")
    assert manifest.table.num_rows == 1
    assert manifest.rejected == {"missing_url": 1, "missing_text": 1, "bad_conversations": 2, "duplicate_row": 1}
    rejected = pq.read_table(tmp_path / "manifest" / "rejected.parquet").to_pylist()
    assert sorted(r["row"] for r in rejected) == [2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "name,content,expected",
    [
        ("bad.csv", b"url,caption\nx.jpg,caf\xe9\n", r"bad\.csv, line 2: not valid UTF-8"),
        ("bad.jsonl", b'{"url": "a.jpg", "caption": "x"}\n{"url": oops}\n', r"bad\.jsonl, line 2: not valid JSON"),
        ("nocol.csv", b"image,text\nx.jpg,hello\n", r"nocol\.csv has no column 'url' \(it has: image, text\); set url_column"),
        ("notext.jsonl", b'{"url": "a.jpg"}\n', r"neither a 'caption' nor a 'conversations' column"),
        ("empty.csv", b"", r"empty\.csv is empty"),
        ("empty.jsonl", b"\n\n", r"empty\.jsonl holds no rows"),
        ("data.xlsx", b"PK", r"unknown format '\.xlsx'; use parquet, csv"),
        ("list.json", b'{"image": "a.jpg"}', r"expected a LLaVA JSON list"),
        ("broken.parquet", b"not parquet", r"broken\.parquet is not a readable parquet file"),
    ],
)
def test_bad_input_fails_with_one_clear_sentence(tmp_path, name, content, expected):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(IngestError, match=expected):
        read_source(tmp_path / name, SourceSettings())


def test_missing_source(tmp_path):
    with pytest.raises(IngestError, match=r"nope\.csv does not exist"):
        read_source(tmp_path / "nope.csv", SourceSettings())


def test_renamed_columns(tmp_path):
    (tmp_path / "rows.csv").write_text("image,text\nx.jpg,hello\n")
    good, _ = read_source(tmp_path / "rows.csv", SourceSettings(url_column="image", caption_column="text"))
    assert good[0]["caption"] == "hello"


def test_rebuild_with_new_rows_only_adds_chunks(tmp_path):
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps({"url": f"{i}.jpg", "caption": f"c{i}"}) + "\n" for i in range(25)))
    settings = SourceSettings(chunk_size=10)
    first = build_manifest([source], tmp_path / "m", settings)
    assert first.chunks == first.new_chunks == ["00000", "00001", "00002"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "m" / "chunks").iterdir()}

    again = build_manifest([source], tmp_path / "m", settings)
    assert again.new_chunks == [] and again.table.equals(first.table)

    with open(source, "a") as f:
        f.write("".join(json.dumps({"url": f"{i}.jpg", "caption": f"c{i}"}) + "\n" for i in range(25, 37)))
    grown = build_manifest([source], tmp_path / "m", settings)
    assert grown.new_chunks == ["00003", "00004"] and grown.table.num_rows == 37
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "m" / "chunks").iterdir() if p.name in mtimes} == mtimes
    by_chunk = {}
    for row in grown.table.to_pylist():
        by_chunk.setdefault(row["chunk"], []).append(row["sample_id"])
    assert sorted(len(v) for v in by_chunk.values()) == [2, 5, 10, 10, 10]


def test_a_transcript_column_reaches_the_manifest(tmp_path):
    rows = [{"url": "a.jpg", "caption": "a sign", "line": " OPEN "}, {"url": "b.jpg", "caption": "a cat", "line": ""}, {"url": "c.jpg", "caption": "x"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    good, _ = read_source(tmp_path / "rows.jsonl", SourceSettings(transcript_column="line"))
    assert [r["transcript"] for r in good] == ["OPEN", None, None]
    assert [r["sample_id"] for r in good] == [r["sample_id"] for r in read_source(tmp_path / "rows.jsonl", SourceSettings())[0]]
    manifest = build_manifest([tmp_path / "rows.jsonl"], tmp_path / "manifest", SourceSettings(transcript_column="line"))
    assert pq.read_table(tmp_path / "manifest" / "manifest.parquet")["transcript"].to_pylist() == ["OPEN", None, None]
    assert manifest.table.num_rows == 3


def test_a_documents_lines_reach_the_manifest_and_bad_ones_are_rejected(tmp_path):
    rows = [{"url": "a.jpg", "caption": "a memo", "lines": [["To: Ann", 0.2], ["From: Bo", 0.3]]}, {"url": "b.jpg", "caption": "a cat"},
            {"url": "c.jpg", "caption": "x", "lines": [["To: Ann", 1.5]]}, {"url": "d.jpg", "caption": "y", "lines": "not json"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    good, bad = read_source(tmp_path / "rows.jsonl", SourceSettings())
    assert [r["lines"] for r in good] == ['[["To: Ann", 0.2], ["From: Bo", 0.3]]', None]
    assert [(r["row"], r["reason"]) for r in bad] == [(3, "bad_lines"), (4, "bad_lines")]


def test_urls_stay_urls_and_each_row_names_its_local_root(tmp_path):
    refs = ["a.jpg", "javascript:alert(1)", "data:image/png;base64,iVBORw0KGgo=", "mailto:x@example.org", "https://example.org/b.jpg"]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"url": ref, "caption": f"c{i}"}) + "\n" for i, ref in enumerate(refs)))
    good, _ = read_source(tmp_path / "rows.jsonl", SourceSettings())
    assert [r["url"] for r in good] == [str(tmp_path / "a.jpg"), *refs[1:]]
    assert {r["local_root"] for r in good} == {str(tmp_path)}
    good, _ = read_source(tmp_path / "rows.jsonl", SourceSettings(image_root=str(tmp_path / "images")))
    assert good[0]["url"] == str(tmp_path / "images" / "a.jpg") and {r["local_root"] for r in good} == {str(tmp_path / "images")}
