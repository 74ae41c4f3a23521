"""Build a real multilingual corpus from Debian's translated manual pages, for the real-text study.

    python3 experiments/real_text_corpus.py --out experiments/data/manpages

Fetches ``manpages`` (English) and ``manpages-<lang>`` (with ``-dev`` where Debian has it) through
``apt-get download`` (package index only, no root needed), unpacks them with ``dpkg-deb -x``, renders every
page with groff to plain UTF-8 text (no line wrapping, no hyphenation), and writes per language
``<out>/<lang>/train.jsonl`` and ``validation.jsonl`` (one record per page: ``text``, ``page``), plus English
instruction data ``<out>/instruct.jsonl`` (``messages``: "What does NAME(SECTION) do?" answered with the page's
NAME line). A page is held out by the hash of its name, the same way in every language, so no translation of a
validation page is trained on in any language. Prints a table of sizes. This is experiment data: tests and the
default run never use it.

Pretraining languages (``--pretrain``) and new languages (``--new``) mirror the AFA paper's split where Debian
has the translations: several scripts and families on each side (see experiments/real_text.md).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# Latin, Cyrillic and Han scripts; Germanic, Romance, Slavic, Sinitic, Uralic and Austroasiatic languages.
PRETRAIN = ["en", "de", "es", "it", "ru", "uk", "cs", "zh", "fi", "vi"]
# AFA's adaptation languages that Debian translates with enough held-out pages: Romance, Slavic, Turkic,
# Germanic and Japonic; new diacritics (pl, tr) and a new script (ja).
NEW = ["fr", "pl", "tr", "nl", "ja"]
# Debian package suffix and man directory for codes that differ from the plain ``manpages-<code>``.
PACKAGES = {"en": ("manpages", ""), "pt": ("manpages-pt-br", "pt_BR"), "zh": ("manpages-zh", "zh_CN")}
SECTION = re.compile(r"\.(\d)[a-z]*(\.gz)?$")


def packages_for(lang: str, dev: bool) -> tuple[list[str], str]:
    """Debian packages carrying ``lang``'s pages, and the man directory they use (``""``: English)."""
    package, mandir = PACKAGES.get(lang, (f"manpages-{lang}", lang))
    names = [package]
    if dev:
        names.append(f"{package}-dev")
    return names, mandir


def available(package: str) -> bool:
    """Whether the package index knows ``package``."""
    out = subprocess.run(["apt-cache", "show", package], capture_output=True, text=True)
    return out.returncode == 0 and bool(out.stdout.strip())


def fetch(packages: list[str], cache: Path) -> Path:
    """Download and unpack ``packages`` into ``cache/root``; returns that root."""
    root = cache / "root"
    root.mkdir(parents=True, exist_ok=True)
    wanted = [p for p in packages if not list(cache.glob(f"{p}_*.deb"))]
    if wanted:
        done = subprocess.run(["apt-get", "download", *wanted], cwd=cache, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"apt-get download {' '.join(wanted)} failed:\n{done.stderr.strip()}")
    for package in packages:
        for deb in cache.glob(f"{package}_*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def pages(root: Path, mandir: str) -> list[Path]:
    """The manual pages of one language under an unpacked root (sections 1-8)."""
    base = root / "usr/share/man" / mandir if mandir else root / "usr/share/man"
    return sorted(p for p in base.glob("man[1-8]/*") if p.is_file() and not p.is_symlink())


def render(path: str) -> tuple[str, str]:
    """(page name, plain text) of one page: groff to UTF-8, header and footer dropped, each heading and each
    paragraph on a line of its own."""
    raw = gzip.open(path).read() if path.endswith(".gz") else Path(path).read_bytes()
    if raw.lstrip().startswith(b".so "):  # a link to another page
        return "", ""
    out = subprocess.run(
        ["groff", "-k", "-T", "utf8", "-man", "-P", "-cbou", "-rHY=0", "-rLL=5000n"],
        input=raw,
        capture_output=True,
    ).stdout.decode("utf-8", errors="replace")
    lines = out.splitlines()[1:-1]  # the running header and footer
    paragraphs, current = [], []
    for line in lines + [""]:
        if not line.strip() or not line.startswith(" "):  # a blank line or a section heading ends a paragraph
            if current:
                paragraphs.append(" ".join(current))
            current = [line.strip()] if line.strip() else []
            if current:  # the heading is a paragraph of its own
                paragraphs.append(current.pop())
        else:
            current.append(line.strip())
    name = SECTION.sub(lambda m: f".{m.group(1)}", Path(path).name.removesuffix(".gz"))
    return name, "\n".join(re.sub(r"\s+", " ", p) for p in paragraphs)


def held_out(page: str, percent: int) -> bool:
    """Whether ``page`` (e.g. ``ls.1``) is a validation page: by its name's hash, the same in every language."""
    return int(hashlib.sha1(page.encode()).hexdigest(), 16) % 100 < percent


def name_line(text: str) -> str | None:
    """The one-line description of an English page (``ls - list directory contents``), if it has one."""
    lines = text.splitlines()
    if len(lines) > 1 and lines[0].strip() == "NAME" and " - " in lines[1]:
        return lines[1].split(" - ", 1)[1].strip()
    return None


def write_jsonl(records: list[dict], path: Path) -> None:
    """Write records as JSON lines through a temporary file in the same directory, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("experiments/data/manpages"))
    parser.add_argument("--cache", type=Path, default=Path("experiments/data/debs"), help="downloaded packages")
    parser.add_argument("--pretrain", nargs="+", default=PRETRAIN)
    parser.add_argument("--new", nargs="+", default=NEW)
    parser.add_argument("--validation-percent", type=int, default=5)
    parser.add_argument("--no-dev", action="store_true", help="leave out the -dev packages (sections 2 and 3)")
    parser.add_argument("--min-chars", type=int, default=200, help="drop pages shorter than this")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    overlap = sorted(set(args.pretrain) & set(args.new))
    if overlap:
        parser.error(f"--pretrain and --new share {overlap}")
    cache = args.cache
    cache.mkdir(parents=True, exist_ok=True)
    rows, instruct = [], []
    with ProcessPoolExecutor(args.workers) as pool:
        for lang in args.pretrain + args.new:
            names, mandir = packages_for(lang, not args.no_dev)
            names = [n for n in names if available(n)]
            if not names:
                sys.exit(f"no Debian package carries manual pages for {lang!r}")
            root = fetch(names, cache / lang)
            split = {"train": [], "validation": []}
            for page, text in pool.map(render, [str(p) for p in pages(root, mandir)], chunksize=16):
                if page and len(text) >= args.min_chars:
                    part = "validation" if held_out(page, args.validation_percent) else "train"
                    split[part].append({"text": text, "page": page})
                    description = name_line(text) if lang == "en" and part == "train" else None
                    if description:
                        question = f"What does {page.rsplit('.', 1)[0]}({page.rsplit('.', 1)[1]}) do?"
                        answer = description[0].upper() + description[1:] + "."
                        instruct.append(
                            {
                                "messages": [
                                    {"role": "user", "content": question},
                                    {"role": "assistant", "content": answer},
                                ]
                            }
                        )
            for part, records in split.items():
                write_jsonl(records, args.out / lang / f"{part}.jsonl")
            chars = {part: sum(len(r["text"]) for r in records) for part, records in split.items()}
            rows.append(
                (
                    lang,
                    "new" if lang in args.new else "pretrain",
                    len(split["train"]),
                    len(split["validation"]),
                    chars["train"],
                    chars["validation"],
                )
            )
            print(f"{lang}: {rows[-1][2]} + {rows[-1][3]} pages", flush=True)
    write_jsonl(instruct, args.out / "instruct.jsonl")
    print("\n| language | role | train pages | validation pages | train MB (chars) | validation MB |")
    print("|---|---|---:|---:|---:|---:|")
    for lang, role, n_train, n_val, c_train, c_val in rows:
        print(f"| {lang} | {role} | {n_train} | {n_val} | {c_train / 1e6:.2f} | {c_val / 1e6:.2f} |")
    print(f"\ninstruction conversations (English NAME lines of training pages): {len(instruct)}")
    print(f"written under {args.out}")


if __name__ == "__main__":
    main()
