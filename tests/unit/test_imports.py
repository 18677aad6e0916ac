"""What a process imports, each in a fresh interpreter: imports cost every server start, every
prosody worker and every CLI call seconds of CPU and hundreds of MB."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


def run(code: str) -> None:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_funasr_is_imported_only_in_the_part_emotion2vec_needs_unless_a_config_names_more():
    """In a fresh interpreter: building emotion2vec leaves FunASR's other models unimported;
    a class its modules do not register completes the package's own import."""
    code = (
        "import sys\n"
        "from engine.funasr_compat import import_for\n"
        "import_for({'model': 'Emotion2vec', 'tokenizer': 'CharTokenizer'})\n"
        "from funasr.register import tables\n"
        "assert tables.model_classes.get('Emotion2vec') is not None\n"
        "assert tables.tokenizer_classes.get('CharTokenizer') is not None\n"
        "assert 'funasr.models.paraformer.model' not in sys.modules\n"
        "import_for({'model': 'Paraformer'})\n"
        "assert tables.model_classes.get('Paraformer') is not None\n"
        "from funasr import AutoModel\n"
    )
    run(code)


def test_a_prosody_worker_imports_neither_torch_nor_the_batcher():
    """A worker runs ``server.sessions.prosody_pool``: torch there cost each one 1.8 s."""
    run(
        "import sys\n"
        "from server.sessions.prosody_pool import _VOICED, measure\n"
        "measure(_VOICED, narrowband=False)  # what a worker does: openSMILE's imports too\n"
        "loaded = {m.split('.')[0] for m in sys.modules} | set(sys.modules)\n"
        "assert not loaded & {'torch', 'funasr', 'engine.batcher'}, loaded & {'torch', 'funasr'}\n"
    )
