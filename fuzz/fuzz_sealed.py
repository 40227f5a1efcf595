"""atheris harness for the sealed-file and tensor-header parsers.

    make fuzz        (or: python fuzz/fuzz_sealed.py -atheris_runs=200000)

Any exception other than a WardenError is a bug.  Seeds: the committed test vectors.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from weightwarden.errors import WardenError
    from weightwarden.sealed import SealedFile
    from weightwarden.sealed import format as F

_WORK = Path(tempfile.mkdtemp(prefix="ww-fuzz-"))
atexit.register(shutil.rmtree, _WORK, True)
TMP = _WORK / "input.wws"
VECTORS = Path(__file__).resolve().parent.parent / "tests" / "vectors"


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeBool():
        with contextlib.suppress(WardenError):
            F.parse_tensor_header(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096)), fdp.ConsumeIntInRange(0, 1 << 20))
        return
    TMP.write_bytes(fdp.ConsumeBytes(len(data)))
    try:
        sf = SealedFile(TMP)
    except WardenError:
        return
    try:
        sf.key_slots()
        sf.check_self_consistent()
        sf.verify_digests(threads=1)
        sf.describe()
    except WardenError:
        pass
    finally:
        sf.close()


def main() -> None:
    corpus = _WORK / "corpus"
    corpus.mkdir()
    for p in VECTORS.glob("*.wws"):
        (corpus / p.name).write_bytes(b"\x00" + p.read_bytes())
    atheris.Setup([*sys.argv, str(corpus)], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
