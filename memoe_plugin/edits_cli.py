"""``memoe-adapter``: list the edits a saved adapter holds, and take chosen ones out (no model needed).

    memoe-adapter list edits.safetensors
    memoe-adapter remove edits.safetensors --ids 3 17 [--out fixed.safetensors]
    memoe-adapter remove edits.safetensors --prompt "The Eiffel Tower is located in"

After a removal the file loads as before (``load_adapter``); the removed edits' prompts get the base model's answers
again and every other edit is unchanged. Edits after a removed one are renumbered (``list`` shows the new ids).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from .persist.edits import EditRemovalError, list_edits, remove_edits_from_file


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memoe-adapter", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="print the edits the file holds, with their ids")
    listing.add_argument("file")
    listing.add_argument("--json", action="store_true", help="one JSON list instead of a table")
    remove = commands.add_parser("remove", help="write the file without the chosen edits")
    remove.add_argument("file")
    remove.add_argument("--ids", nargs="*", type=int, default=[], metavar="ID", help="edit ids, as `list` prints them")
    remove.add_argument("--prompt", nargs="*", default=[], metavar="TEXT",
                        help="remove every edit whose prompt is exactly this text")
    remove.add_argument("--out", help="write here instead of replacing FILE (atomically)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        edits = list_edits(args.file)
        if args.command == "list":
            if args.json:
                print(json.dumps(edits, ensure_ascii=False, indent=1))
            else:
                print(f"{len(edits)} edits in {args.file}")
                for edit in edits:
                    subject = f"  [{edit['subject']}]" if edit.get("subject") else ""
                    print(f"{edit['id']:>6}  {edit['prompt']!r} -> {edit['target_new']!r}{subject}")
            return 0
        ids = set(args.ids)
        for text in args.prompt:
            found = [e["id"] for e in edits if e["prompt"] == text]
            if not found:
                raise EditRemovalError(f"no edit has the prompt {text!r}; `memoe-adapter list {args.file}` shows them")
            ids.update(found)
        written, removed = remove_edits_from_file(args.file, ids, args.out)
    except (ValueError, OSError) as err:
        print(f"memoe-adapter: {err}", file=sys.stderr)
        return 2
    for edit in removed:
        print(f"removed {edit['prompt']!r} -> {edit['target_new']!r}")
    print(f"wrote {written} ({len(edits) - len(removed)} edits left)")
    return 0


if __name__ == "__main__":   # pragma: no cover
    sys.exit(main())
