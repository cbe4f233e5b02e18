"""An embedded sample of real evaluation rows, so that the evals run offline: about 100 seeded rows of each of the
ten raw datasets behind CORE (core/, `train.core_eval.load_raw(SAMPLE_DIR)`: CORE-10) and of the chat-eval sets
(chat/), one jsonl file each in the Hugging Face schema; README.md gives sources, licences, row counts and how draw.py
drew them, manifest.json the seed, the source-row indices and every file's sha256."""
import json
import os
from dataclasses import dataclass

from train.tasks.common import TaskError, read_rows

SAMPLE_DIR = os.path.dirname(os.path.abspath(__file__))

@dataclass(frozen=True)
class Source:
    """One sampled file. name: its path under the sample and source folders, without extension; hf: HF dataset id,
    config and split; licence: as published; note: where that licence is stated, if not in the shared README."""
    name: str
    hf: str
    licence: str
    note: str = ""

SOURCES = (
    Source("core/hellaswag_validation", "Rowan/hellaswag validation", "MIT", "rowanz/hellaswag LICENSE"),
    Source("core/arc_easy_validation", "allenai/ai2_arc ARC-Easy validation", "CC BY-SA 4.0"),
    Source("core/arc_challenge_validation", "allenai/ai2_arc ARC-Challenge validation", "CC BY-SA 4.0"),
    Source("core/copa_validation", "super_glue copa validation", "BSD 2-Clause", "the super_glue dataset card"),
    Source("core/commonsense_qa_validation", "tau/commonsense_qa validation", "MIT", "its HF dataset card"),
    Source("core/piqa_validation", "ybisk/piqa validation", "AFL-3.0",
           "the original release (ybisk.github.io/piqa); the HF card says unknown"),
    Source("core/openbookqa_validation", "allenai/openbookqa main validation", "Apache-2.0",
           "the allenai/OpenBookQA repository; the HF card says unknown"),
    Source("core/lambada_openai_test", "EleutherAI/lambada_openai test", "MIT",
           "its HF dataset card; the original LAMBADA is CC BY 4.0"),
    Source("core/winogrande_validation", "allenai/winogrande winogrande_xl validation", "CC-BY",
           "the allenai/winogrande README; the HF card names none"),
    Source("core/boolq_validation", "super_glue boolq validation", "CC BY-SA 3.0", "the super_glue dataset card"),
    Source("chat/ARC-Easy_test_reconstructed", "allenai/ai2_arc ARC-Easy test", "CC BY-SA 4.0"),
    Source("chat/ARC-Challenge_test_reconstructed", "allenai/ai2_arc ARC-Challenge test", "CC BY-SA 4.0"),
    Source("chat/mmlu_all_test", "cais/mmlu all test", "MIT"),
    Source("chat/gsm8k_main_test", "openai/gsm8k main test", "MIT"),
    Source("chat/humaneval_test", "openai/openai_humaneval test", "MIT"),
)

def sample_path(name, root=SAMPLE_DIR):
    """Path of the sample file `name` ("chat/mmlu_all_test") under root."""
    return os.path.join(root, name + ".jsonl")

def sample_rows(name, root=SAMPLE_DIR):
    """The rows (list of dicts) of one sample file. TaskError when it is missing or does not parse."""
    if not os.path.isfile(path := sample_path(name, root)):
        raise TaskError(f"no embedded sample {name!r} at {path} (known: {', '.join(s.name for s in SOURCES)})")
    return read_rows(path)

def manifest(root=SAMPLE_DIR):
    """manifest.json -> dict: seed, per_file, command, files {name: {source, source_rows, rows, indices, sha256}}."""
    with open(os.path.join(root, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)
