import csv
import io
import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from beni_pipeline.prep.ingest import MAX_RECORD_LINES, MAX_ROW_CHARS, IngestError, SourceSettings, build_manifest, read_source

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
        {"url": "c.jpg", "conversations": '[{"from": "robot", "value": "hi"}]'},
        {"url": "d.jpg", "conversations": "{not json"},
        {"url": "a.jpg", "caption": "ok"},
    ]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = build_manifest([tmp_path / "rows.jsonl"], tmp_path / "manifest")
    assert manifest.table.num_rows == 1
    assert manifest.rejected == {"missing_url": 1, "missing_text": 1, "bad_conversations": 2, "duplicate_row": 1}
    rejected = pq.read_table(tmp_path / "manifest" / "rejected.parquet").to_pylist()
    assert sorted(r["row"] for r in rejected) == [2, 3, 4, 5, 6]


def test_a_source_with_no_usable_row_fails_with_its_reasons(tmp_path):
    rows = [{"url": f"{i}.jpg", "caption": ""} for i in range(3)] + [{"url": "", "caption": "no image"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(
        IngestError, match=r"none of the 4 rows of the sources is usable \(missing_text 3, missing_url 1\); .*rejected\.parquet"
    ):
        build_manifest([tmp_path / "rows.jsonl"], tmp_path / "manifest")
    assert pq.read_table(tmp_path / "manifest" / "rejected.parquet")["row"].to_pylist() == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "name,content,expected",
    [
        ("bad.csv", b"url,caption\nx.jpg,caf\xe9\n", r"bad\.csv, line 2: not valid UTF-8"),
        ("bad.jsonl", b'\n{"url": oops}\n[1]\n', r"bad\.jsonl, line 2: not valid JSON, and no row of the file could be read; write one"),
        ("image.csv", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", r"image\.csv, line 1: the header row is unreadable \(not valid UTF-8 text\)"),
        ("latin1.tsv", b"url\tcaption\nx.jpg\tcaf\xe9\n\ny.jpg\tna\xefve\n", r"latin1\.tsv, line 2: not valid UTF-8 text, and no row"),
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
    rows = [
        {"url": "a.jpg", "caption": "a sign", "line": " OPEN "},
        {"url": "b.jpg", "caption": "a cat", "line": ""},
        {"url": "c.jpg", "caption": "x"},
    ]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    good, _ = read_source(tmp_path / "rows.jsonl", SourceSettings(transcript_column="line"))
    assert [r["transcript"] for r in good] == ["OPEN", None, None]
    assert [r["sample_id"] for r in good] == [r["sample_id"] for r in read_source(tmp_path / "rows.jsonl", SourceSettings())[0]]
    manifest = build_manifest([tmp_path / "rows.jsonl"], tmp_path / "manifest", SourceSettings(transcript_column="line"))
    assert pq.read_table(tmp_path / "manifest" / "manifest.parquet")["transcript"].to_pylist() == ["OPEN", None, None]
    assert manifest.table.num_rows == 3


def test_a_documents_lines_reach_the_manifest_and_bad_ones_are_rejected(tmp_path):
    rows = [
        {"url": "a.jpg", "caption": "a memo", "lines": [["To: Ann", 0.2], ["From: Bo", 0.3]]},
        {"url": "b.jpg", "caption": "a cat"},
        {"url": "c.jpg", "caption": "x", "lines": [["To: Ann", 1.5]]},
        {"url": "d.jpg", "caption": "y", "lines": "not json"},
    ]
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


CSV_FAULTS = (
    "url,caption\n"
    'a.jpg,"unclosed caption\n'  # 2: would swallow lines 3-4 into one caption
    "b.jpg,cap b\n"
    "c.jpg,cap c,extra\n"  # 4
    'd.jpg,"quoted" tail\n'  # 5: csv would drop the quotes and keep the tail
    'e.jpg,a 5" screen\n'  # 6: a quote inside an unquoted field is text
    "f.jpg,caf\udce9\n"  # 7: one Latin-1 byte
    'g.jpg,"two\n'
    'lines"\n'  # 8-9: one row
    "h.jpg\n"  # 10
    "\n"
    'j.jpg,"last unclosed\n'  # 12
    "k.jpg,cap k\n"
)


@pytest.mark.parametrize("name", ["rows.csv", "rows.tsv"])
def test_malformed_csv_rows_are_rejected_one_by_one_at_their_line(tmp_path, name):
    text = CSV_FAULTS if name.endswith(".csv") else CSV_FAULTS.replace(",", "\t")
    (tmp_path / name).write_bytes(text.encode(errors="surrogateescape"))
    good, bad = read_source(tmp_path / name, SourceSettings())
    assert [(g["row"], g["caption"]) for g in good] == [(3, "cap b"), (6, 'a 5" screen'), (8, "two\nlines"), (13, "cap k")]
    assert [(b["row"], b["reason"]) for b in bad] == [
        (2, "unclosed_quote"),
        (4, "wrong_field_count"),
        (5, "malformed_row"),
        (7, "bad_encoding"),
        (10, "wrong_field_count"),
        (12, "unclosed_quote"),
    ]


def test_a_quote_open_past_the_line_limit_costs_one_row(tmp_path):
    lines = ["url,caption", 'a.jpg,"open'] + [f"{i}.jpg,caption {i}" for i in range(MAX_RECORD_LINES + 10)] + ['z.jpg,"closes it",x']
    (tmp_path / "rows.csv").write_text("\n".join(lines) + "\n")
    good, bad = read_source(tmp_path / "rows.csv", SourceSettings())
    assert [(b["row"], b["reason"]) for b in bad] == [(2, "unclosed_quote"), (len(lines), "wrong_field_count")]
    assert [g["row"] for g in good] == list(range(3, len(lines)))


@pytest.mark.parametrize("name", ["rows.csv", "rows.tsv", "rows.jsonl"])
def test_long_captions_are_read_in_every_format_and_overlong_rows_rejected(tmp_path, name):
    long, overlong = "word " * 300_000, "x" * (MAX_ROW_CHARS + 1)  # 1.5 MB, past the csv module's 128 KiB default
    rows = [{"url": "a.jpg", "caption": long}, {"url": "b.jpg", "caption": "short"}, {"url": "c.jpg", "caption": overlong}]
    rows.append({"url": "d.jpg", "caption": "end"})
    if name.endswith(".jsonl"):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with open(tmp_path / name, "w", newline="") as f:
            writer = csv.DictWriter(f, ["url", "caption"], delimiter="\t" if name.endswith(".tsv") else ",", lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
    first = 1 if name.endswith(".jsonl") else 2
    good, bad = read_source(tmp_path / name, SourceSettings())
    assert [(g["row"], len(g["caption"])) for g in good] == [(first, len(long.strip())), (first + 1, 5), (first + 3, 3)]
    assert [(b["row"], b["reason"]) for b in bad] == [(first + 2, "row_too_large")]


def test_jsonl_rows_are_rejected_one_by_one_and_only_newlines_end_them(tmp_path):
    lines = [
        json.dumps({"url": "a.jpg", "caption": "para one\u2028para two\x0cthree"}, ensure_ascii=False),  # not line ends in jsonl
        '{"url": "b.jpg", "caption": oops}',
        "[1, 2]",
        '{"url": "c.jpg", "caption": "caf\udce9"}',  # one Latin-1 byte
        '{"url": "d.jpg", "caption": "half a pair \\ud800"}',  # valid JSON, not text
        "",
        '{"url": "nul\\u0000.jpg", "caption": "a NUL is in no path or URL"}',
        '{"url": "e.jpg", "caption": "last"}',
    ]
    (tmp_path / "rows.jsonl").write_bytes("\n".join(lines).encode(errors="surrogateescape"))
    manifest = build_manifest([tmp_path / "rows.jsonl"], tmp_path / "manifest")
    assert manifest.table["row"].to_pylist() == [1, 8]
    assert manifest.table["caption"][0].as_py() == "para one\u2028para two\x0cthree"
    rejected = pq.read_table(tmp_path / "manifest" / "rejected.parquet")
    assert list(zip(rejected["row"].to_pylist(), rejected["reason"].to_pylist())) == [
        (2, "bad_json"),
        (3, "not_an_object"),
        (4, "bad_encoding"),
        (5, "bad_encoding"),
        (7, "bad_url"),
    ]


def test_a_bad_sidecar_rejects_its_image_not_the_folder(tmp_path):
    for name in ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "a.txt").write_text("fine")
    (tmp_path / "b.txt").write_bytes(b"caf\xe9")
    (tmp_path / "c.json").write_text("{not json")
    (tmp_path / "d.json").write_text(json.dumps({"caption": "also fine"}))
    good, bad = read_source(tmp_path, SourceSettings())
    assert [(g["row"], g["caption"]) for g in good] == [(1, "fine"), (4, "also fine")]
    assert [(b["row"], b["reason"]) for b in bad] == [(2, "bad_encoding"), (3, "bad_json")]


PROPERTY = settings(max_examples=80, derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PARSER_REASONS = {"bad_encoding", "unclosed_quote", "malformed_row", "wrong_field_count", "row_too_large", "bad_json", "not_an_object"}
TOKENS = ["a.jpg", "cap", " ", ",", "\t", '"', "\n", "\r\n", "\r", "{", "}", "[", ":", '"url": "u"', '"caption": "c"']
TOKENS += ["é", "\u2028", "\x00", "\udcff"]
HEADERS = {"rows.csv": "url,caption\n", "rows.tsv": "url\tcaption\n", "rows.jsonl": ""}


def outcomes(path) -> dict[int, str] | None:
    """Line -> "ok" or the rejection reason of every row read from `path`; None when the file as a whole is refused."""
    try:
        good, bad = read_source(path, SourceSettings())
    except IngestError:
        return None
    rows = [(g["row"], "ok") for g in good] + [(b["row"], b["reason"]) for b in bad]
    assert len({row for row, _ in rows}) == len(rows), rows
    return dict(rows)


@st.composite
def files_of_any_bytes(draw) -> tuple[str, bytes]:
    """Anything, leaning on what parsers trip over: quotes, delimiters, line ends, braces, stray bytes, under the
    header of the file's format most of the time."""
    name = draw(st.sampled_from(sorted(HEADERS)))
    if draw(st.integers(0, 9)) == 0:
        return name, draw(st.binary(max_size=200))
    good = {"rows.csv": "a.jpg,cap\n", "rows.tsv": "a.jpg\tcap\n", "rows.jsonl": '{"url": "a.jpg", "caption": "cap"}\n'}[name]
    junk = st.lists(st.sampled_from(TOKENS), max_size=12).map("".join)
    text = HEADERS[name] + "".join(draw(st.lists(st.one_of(st.just(good), junk), max_size=10)))
    return name, text.encode(errors="surrogateescape")


@PROPERTY
@given(files_of_any_bytes())
def test_any_bytes_give_rows_or_one_ingest_error(file):
    name, content = file
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(content)
        rows = outcomes(path)
        if rows is not None:
            lines = content.split(b"\n")
            assert all(lines[row - 1].strip(b"\r\n") for row in rows)  # every row starts on a line with something on it
            if name.endswith(".jsonl"):  # a jsonl row is a non-blank line, each of them
                assert set(rows) == {i + 1 for i, line in enumerate(lines) if line.decode(errors="replace").strip()}
            try:  # and the rows can be written
                build_manifest([path], Path(tmp) / "manifest")
            except IngestError:  # as it must be when no row is usable
                assert "ok" not in rows.values()


# No field starts with a quote, a delimiter or a line break: after a quote left open, such a field closes it into
# valid csv (`a,"open` then `b,"` then a line break is one row of two fields), which no parser can tell from intent.
FIELD = st.text(max_size=12).map(lambda t: t.lstrip('"\r\n,\t'))
PLAIN = st.text(alphabet=st.characters(codec="utf-8", exclude_characters=',\t"\r\n'), min_size=1, max_size=12)

EXPECTED_REASON = {
    "extra_field": "wrong_field_count",
    "missing_field": "wrong_field_count",
    "unclosed_quote": "unclosed_quote",
    "text_after_quote": "malformed_row",
    "bad_byte": "bad_encoding",
}
CSV_ROWS = st.one_of(
    st.tuples(st.just("good"), FIELD, FIELD),
    st.tuples(st.just("extra_field"), FIELD, FIELD, FIELD),
    st.tuples(st.just("missing_field"), FIELD),
    st.tuples(st.just("unclosed_quote"), PLAIN),
    st.tuples(st.just("text_after_quote"), PLAIN),
    st.tuples(st.just("stray_quote"), PLAIN),
    st.tuples(st.just("bad_byte"), FIELD, FIELD),
    st.tuples(st.just("blank")),
)


def write_csv_rows(rows: list[tuple], delimiter: str, end: str, quoting: int) -> tuple[str, dict[int, tuple]]:
    """The file's text and, per row, its first line and what it was."""
    if quoting == csv.QUOTE_MINIMAL and end == "\n":  # the writer would leave a carriage return unquoted, which csv forbids
        rows = [(kind, *(f.replace("\r", "") for f in fields)) for kind, *fields in rows]
    out = io.StringIO()
    writer = csv.writer(out, delimiter=delimiter, lineterminator=end, quoting=quoting)
    writer.writerow(["url", "caption"])
    starts = {}
    for row in rows:
        kind, *fields = row
        line = out.getvalue().count("\n") + 1
        if kind == "unclosed_quote":
            out.write(f'u.jpg{delimiter}"{fields[0]}{end}')
        elif kind == "text_after_quote":
            out.write(f't.jpg{delimiter}"{fields[0]}" tail{end}')
        elif kind == "stray_quote":
            out.write(f's.jpg{delimiter}{fields[0]}5" screen{end}')
        elif kind == "bad_byte":
            writer.writerow([fields[0], fields[1] + "\udcff"])  # one byte that is not UTF-8
        elif kind == "blank":
            out.write(end)
            continue
        else:
            writer.writerow(fields)
        starts[line] = row
    return out.getvalue(), starts


@PROPERTY
@given(
    st.lists(CSV_ROWS, max_size=12),
    st.sampled_from([",", "\t"]),
    st.sampled_from(["\n", "\r\n"]),
    st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]),
)
def test_every_csv_row_ends_as_one_manifest_row_or_one_rejection(rows, delimiter, end, quoting):
    """A csv/tsv row is a record: a physical line, or several when a quoted field holds line breaks. Each row gives
    exactly one outcome, at its first line, for the reason it was written with; blank lines give none."""
    text, starts = write_csv_rows(rows, delimiter, end, quoting)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("rows.csv" if delimiter == "," else "rows.tsv")
        path.write_bytes(text.encode(errors="surrogateescape"))
        got = outcomes(path)
        if got is None:  # only a file none of whose rows parse is refused
            assert all(row[0] not in ("good", "stray_quote") for row in starts.values())
            return
        good = {g["row"]: g for g in read_source(path, SourceSettings())[0]}
    assert set(got) == set(starts)
    for line, (kind, *fields) in starts.items():
        if kind == "good":
            assert got[line] not in PARSER_REASONS
            if got[line] == "ok":
                assert good[line]["caption"] == fields[1].strip()
        elif kind == "stray_quote":
            assert got[line] == "ok" and good[line]["caption"] == f'{fields[0]}5" screen'.strip()
        else:
            assert got[line] == EXPECTED_REASON[kind]


JSONL_ROWS = st.one_of(
    st.tuples(st.just("good"), st.fixed_dictionaries({"url": st.text(), "caption": st.text()}), st.booleans()),
    st.tuples(st.just("bad_json"), PLAIN.map(lambda t: "{" + t)),
    st.tuples(st.just("not_an_object"), st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.text(max_size=5))),
    st.tuples(st.just("bad_encoding"), st.text(max_size=5)),
    st.tuples(st.just("blank"), st.sampled_from(["", " ", "\t", "\r"])),
)


@PROPERTY
@given(st.lists(JSONL_ROWS, max_size=12))
def test_every_jsonl_line_ends_as_one_manifest_row_or_one_rejection(rows):
    """A jsonl row is a non-blank line (split at "\\n" only): each gives one outcome at its line, for its reason."""
    lines, expected = [], {}
    for i, (kind, value, *ascii_only) in enumerate(rows, start=1):
        if kind == "good":
            lines.append(json.dumps(value, ensure_ascii=ascii_only[0]))
        elif kind == "bad_json":
            lines.append(value)
        elif kind == "not_an_object":
            lines.append(json.dumps(value))
        elif kind == "bad_encoding":
            lines.append(json.dumps({"url": "a.jpg", "caption": value}, ensure_ascii=False) + "\udcff")
        else:
            lines.append(value)
        if kind != "blank":
            expected[i] = kind
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        path.write_bytes("\n".join(lines).encode(errors="surrogateescape"))
        got = outcomes(path)
    if got is None:
        assert "good" not in expected.values()
    else:
        assert set(got) == set(expected)
        for line, kind in expected.items():
            assert got[line] not in PARSER_REASONS if kind == "good" else got[line] == kind
