"""Download benchmark: beni's downloader against img2dataset 1.47, same images, same server, same run.

Real JPEGs (gradients, shapes and noise; 320x240 to 1024x768; some with an EXIF orientation) are
served by nginx on 127.0.0.1. Both tools resize to 256 centre-crop, re-encode JPEG quality 95 and
write webdataset-style tars, with the same number of worker processes. Runs alternate
(img2dataset, beni, img2dataset, beni, ...) to cancel drift on a shared machine; only the download
call is timed. Results: a markdown block for bench/BENCHMARKS.md and bench/out/download.json.

    .venv/bin/python bench/download.py [--images 3000] [--repeats 2] [--processes 2] [--threads 64]
"""

import argparse
import hashlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter

OUT = Path(__file__).resolve().parent / "out"
I2D_VENV = OUT / "img2dataset-venv"
I2D_VERSION = "1.47.0"
ORIENTATIONS = (3, 6, 8)  # every 7th image carries one of these EXIF orientation tags

I2D_RUNNER = """
import json, resource, sys, time
from img2dataset import download
def cpu():
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))
kwargs = json.loads(sys.argv[1])
start, cpu0 = time.perf_counter(), cpu()
download(**kwargs)
print("BENCH", time.perf_counter() - start, cpu() - cpu0)
"""


def cpu_seconds() -> float:
    """CPU time of this process and its waited-for children (worker processes, not nginx)."""
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))


def count_jpgs(folder: Path) -> int:
    """Images actually present in the tars a run wrote (what a reader of the output would get)."""
    count = 0
    for path in folder.glob("*.tar"):
        with tarfile.open(path) as tar:
            count += sum(m.name.endswith(".jpg") for m in tar)
    return count


def make_image(i: int, path: Path) -> None:
    """A photo-like JPEG: a colour gradient, random shapes, a slight blur and sensor-like noise."""
    rng = np.random.default_rng(i)
    w, h = int(rng.integers(320, 1025)), int(rng.integers(240, 769))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, 2 * np.pi)
    t = x * np.cos(a) + y * np.sin(a)
    t = (t - t.min()) / (np.ptp(t) + 1)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = Image.fromarray((c0 + (c1 - c0) * t[..., None]).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 20))):
        x0, x1 = sorted(rng.integers(0, w, 2))
        y0, y1 = sorted(rng.integers(0, h, 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = rng.integers(0, 3)
        if shape == 0:
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == 1:
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.line((x0, y0, x1, y1), fill=fill, width=int(rng.integers(2, 12)))
    pixels = np.asarray(img.filter(ImageFilter.GaussianBlur(1.2)), dtype=np.float32)
    pixels += rng.normal(0, rng.uniform(3, 9), pixels.shape)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    exif = Image.Exif()
    if i % 7 == 0:
        exif[0x0112] = ORIENTATIONS[(i // 7) % 3]
    img.save(path, "JPEG", quality=90, exif=exif)


def generate_images(n: int) -> Path:
    """Cached under bench/out/images-<n>/; regenerated only when incomplete."""
    folder = OUT / f"images-{n}"
    if (folder / "DONE").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(
            pool.map(
                make_image,
                range(n),
                [folder / f"{i:05d}.jpg" for i in range(n)],
                chunksize=16,
            )
        )
    (folder / "DONE").write_text("ok\n")
    size = sum(p.stat().st_size for p in folder.glob("*.jpg"))
    print(f"generated {n} JPEGs ({size / n / 1024:.0f} KiB mean) in {time.perf_counter() - start:.0f} s")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nginx(root: Path, tmp: Path) -> tuple[subprocess.Popen, str]:
    if not shutil.which("nginx") and not Path("/usr/sbin/nginx").exists():
        print("nginx missing: installing it from Debian's packages")
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "nginx"],
            check=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    port = free_port()
    temps = "\n".join(f"  {k}_temp_path {tmp}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = tmp / "nginx.conf"
    conf.write_text(
        textwrap.dedent(f"""\
        {"user root root;" if os.geteuid() == 0 else ""}
        daemon off;
        worker_processes 1;
        pid {tmp}/nginx.pid;
        error_log {tmp}/error.log warn;
        events {{ worker_connections 4096; }}
        http {{
        {temps}
          access_log off;
          sendfile on;
          tcp_nopush on;
          keepalive_requests 100000;
          types {{ image/jpeg jpg; }}
          server {{ listen 127.0.0.1:{port}; root {root}; }}
        }}
        """)
    )
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = subprocess.Popen([nginx, "-p", str(tmp), "-c", str(conf), "-e", f"{tmp}/error.log"])
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(f"{base}/00000.jpg", timeout=1).read()
            return proc, base
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {(tmp / 'error.log').read_text()}")
            time.sleep(0.1)
    raise RuntimeError("nginx did not answer within 10 s")


def ensure_img2dataset() -> Path:
    python = I2D_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {I2D_VENV} with img2dataset=={I2D_VERSION}")
        subprocess.run([sys.executable, "-m", "venv", str(I2D_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", f"img2dataset=={I2D_VERSION}"],
            check=True,
        )
    return python


def run_img2dataset(python: Path, urls_txt: Path, n: int, args) -> dict:
    out = OUT / "run-img2dataset"
    shutil.rmtree(out, ignore_errors=True)
    kwargs = {
        "url_list": str(urls_txt),
        "input_format": "txt",
        "output_folder": str(out),
        "output_format": "webdataset",
        "image_size": 256,
        "resize_mode": "center_crop",
        "encode_format": "jpg",
        "encode_quality": 95,
        "processes_count": args.processes,
        "thread_count": args.threads,
        "distributor": "multiprocessing",
        "number_sample_per_shard": -(-n // args.processes),  # one shard per process: its best case
        "disable_all_reencoding": False,
        "enable_wandb": False,
        "timeout": 10,
        "retries": 0,
    }
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [str(python), "-c", I2D_RUNNER, json.dumps(kwargs)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"img2dataset failed:\n{proc.stderr[-3000:]}")
    seconds, cpu = map(
        float,
        next(line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("BENCH ")),
    )
    stats = [json.loads(p.read_text()) for p in out.glob("*_stats.json")]
    ok = sum(s["successes"] for s in stats)
    in_tars = count_jpgs(out)
    failed = sum(s["failed_to_download"] + s["failed_to_resize"] for s in stats)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "ok": ok,
        "in_tars": in_tars,
        "failed": failed,
        "lost": n - in_tars,
    }


def run_beni(sample_ids: list[str], urls: list[str], args) -> dict:
    from beni_pipeline.prep.download import DownloadSettings, download_chunk

    out = OUT / "run-beni"
    shutil.rmtree(out, ignore_errors=True)
    settings = DownloadSettings(
        workers=args.processes,
        resize_mode="center_crop",
        image_size=256,
        image_format="jpg",
        quality=95,
        allowed_networks=["127.0.0.1/32"],  # nginx is on loopback; allowed this way the address check still runs as for public hosts
    )
    start, cpu0 = time.perf_counter(), cpu_seconds()
    summary = download_chunk(pa.table({"sample_id": sample_ids, "url": urls}), out, settings)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
    index = pq.read_table(out / "index.parquet").to_pydict()
    ok = sum(s == "ok" for s in index["status"])
    in_tars = count_jpgs(out)
    exactly_once = sorted(index["sample_id"]) == sorted(sample_ids)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "workers_seconds": summary.seconds,
        "ok": ok,
        "in_tars": in_tars,
        "counts": summary.counts,
        "exactly_once": exactly_once,
        "lost": len(sample_ids) - ok + (0 if exactly_once else 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=64, help="img2dataset thread_count per process")
    parser.add_argument("--only", choices=["img2dataset", "beni"], help="run one side only")
    args = parser.parse_args()
    n = args.images
    images = generate_images(n)
    python = ensure_img2dataset()
    runs: dict[str, list[dict]] = {"img2dataset": [], "beni": []}
    with tempfile.TemporaryDirectory(prefix="beni-nginx-") as tmp:
        nginx, base = start_nginx(images, Path(tmp))
        try:
            urls = [f"{base}/{i:05d}.jpg" for i in range(n)]
            urls_txt = OUT / f"urls-{n}.txt"
            urls_txt.write_text("\n".join(urls) + "\n")
            sample_ids = [hashlib.sha256(u.encode()).hexdigest()[:16] for u in urls]
            sides = [args.only] if args.only else ["img2dataset", "beni"]
            for rep in range(args.repeats):
                for side in sides:
                    r = run_img2dataset(python, urls_txt, n, args) if side == "img2dataset" else run_beni(sample_ids, urls, args)
                    r["images_per_s"] = r["in_tars"] / r["seconds"]
                    r["images_per_cpu_s"] = r["in_tars"] / r["cpu_seconds"]
                    runs[side].append(r)
                    print(
                        f"[{rep + 1}/{args.repeats}] {side:11s} {r['seconds']:6.2f} s  {r['images_per_s']:4.0f} images/s"
                        f"  {r['images_per_cpu_s']:4.0f} images/CPU-s  ok={r['ok']} in_tars={r['in_tars']} lost={r['lost']}",
                        flush=True,
                    )
        finally:
            nginx.terminate()
            nginx.wait()
    report(runs, args)


def report(runs: dict[str, list[dict]], args) -> None:
    """Rates over all repeats of a side (total images / total seconds), the ratio, a markdown block, the JSON."""
    n = args.images
    result = {
        "images": n,
        "processes": args.processes,
        "img2dataset_threads": args.threads,
        "cores": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d"),
        "runs": runs,
    }
    for side, rs in runs.items():
        if rs:
            images = sum(r["in_tars"] for r in rs)
            rate = images / sum(r["seconds"] for r in rs)
            result[side] = {
                "images_per_s": rate,
                "per_process": rate / args.processes,
                "images_per_cpu_s": images / sum(r["cpu_seconds"] for r in rs),
                "lost": sum(r["lost"] for r in rs),
            }
    base = result.get("img2dataset")
    if base and "beni" in result:
        result["ratio"] = result["beni"]["images_per_s"] / base["images_per_s"]
        result["ratio_cpu"] = result["beni"]["images_per_cpu_s"] / base["images_per_cpu_s"]
    (OUT / "download.json").write_text(json.dumps(result, indent=2))

    print(
        f"\n`.venv/bin/python bench/download.py --images {n} --repeats {args.repeats}` ({result['date']}, "
        f"{os.cpu_count()}-core shared CPU, nginx on loopback, {n} JPEGs 320x240..1024x768 -> 256 centre-crop, "
        f"JPEG q95, webdataset tars, {args.processes} worker processes each, img2dataset thread_count {args.threads}, "
        f"runs alternated, {args.repeats} each):\n"
    )
    print("| downloader | images/s | images/s per process | images per CPU-second | lost | vs img2dataset (wall / CPU) |")
    print("|---|---|---|---|---|---|")
    for side in ("img2dataset", "beni"):
        if side in result:
            r = result[side]
            vs = (
                f"{r['images_per_s'] / base['images_per_s']:.2f}x / {r['images_per_cpu_s'] / base['images_per_cpu_s']:.2f}x"
                if base
                else "-"
            )
            name = f"img2dataset {I2D_VERSION}" if side == "img2dataset" else "beni"
            print(f"| {name} | {r['images_per_s']:.0f} | {r['per_process']:.0f} | {r['images_per_cpu_s']:.0f} | {r['lost']} | {vs} |")
    print(f"\nwrote {OUT / 'download.json'}")


if __name__ == "__main__":
    main()
