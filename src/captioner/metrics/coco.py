"""BLEU-1..4, METEOR, ROUGE-L and CIDEr-D exactly as the COCO caption evaluation code computes them.

The scorers are pycocoevalcap's own (``Bleu(4)``, ``Meteor``, ``Rouge``, ``Cider``; its CIDEr is
CIDEr-D), fed text tokenised by the Stanford PTB tokenizer it ships, with punctuation removed as its
``PTBTokenizer`` does. ``COCOEvalCap.evaluate()`` is not used: it also builds SPICE, which downloads
Stanford CoreNLP at run time. The tokenizer jar is run from a temporary folder rather than the
package folder (which may be read-only), and METEOR's JVM is started per call and always stopped.

Scores are corpus-level on the 0-100 scale: BLEU from corpus n-gram counts (pycocoevalcap's
"closest" reference length), METEOR from the corpus statistics, ROUGE-L and CIDEr-D as the mean over
images, as in published tables. Never compare these with NLTK's BLEU.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path

from captioner.errors import CaptionerError

METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")
PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_JAVA_HELP = "install a Java runtime, e.g. apt install default-jre-headless"
_METEOR_LOCK = threading.Lock()


class MetricsError(CaptionerError):
    """The inputs cannot be scored, or the scorer could not run."""


def _package_file(module: str, name: str) -> Path:
    """A file shipped beside one of pycocoevalcap's modules (it is a namespace package: no __file__)."""
    import importlib

    try:
        found = importlib.import_module(f"pycocoevalcap.{module}")
    except ImportError:
        raise MetricsError("the COCO caption metrics need pycocoevalcap (pip install pycocoevalcap)") from None
    return Path(found.__file__).resolve().parent / name  # type: ignore[arg-type]


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise MetricsError(f"METEOR and the PTB tokenizer need Java, which is not installed ({_JAVA_HELP})")
    return java


def ptb_tokenize(sentences: Sequence[str]) -> list[str]:
    """Stanford PTB tokenisation, lower-cased, punctuation removed: what pycocoevalcap scores on."""
    if not sentences:
        return []
    jar = _package_file("tokenizer.ptbtokenizer", "stanford-corenlp-3.4.1.jar")
    cleaned = [" ".join(sentence.split()) for sentence in sentences]  # one line each: no newlines or tabs inside
    with tempfile.TemporaryDirectory(prefix="captioner-ptb-") as folder:
        path = Path(folder) / "sentences.txt"
        path.write_text("\n".join(cleaned), encoding="utf-8")
        result = subprocess.run(
            [_java(), "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", str(path)],
            capture_output=True,
            timeout=600,
        )
    if result.returncode != 0:
        first_line = result.stderr.decode(errors="replace").strip().splitlines()[:1]
        raise MetricsError(f"the PTB tokenizer failed (exit {result.returncode}): {first_line[0] if first_line else 'no message'}")
    lines = result.stdout.decode("utf-8", errors="replace").split("\n")
    lines = lines[: len(cleaned)] + [""] * (len(cleaned) - len(lines))
    return [" ".join(word for word in line.rstrip().split(" ") if word and word not in PUNCTUATION) for line in lines]


def score_captions(
    generated: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    metrics: Iterable[str] | None = None,
    tokenize: bool = True,
) -> dict[str, float]:
    """Corpus-level scores (0-100) of one generated caption per image against all its references.

    ``metrics`` picks from :data:`METRIC_NAMES` (default: all; leaving METEOR out saves its ~2-6 s
    JVM start). ``tokenize=False`` scores text that is already PTB-tokenised (no Java needed unless
    METEOR is asked for).
    """
    wanted = list(METRIC_NAMES) if metrics is None else list(dict.fromkeys(metrics))
    unknown = [name for name in wanted if name not in METRIC_NAMES]
    if unknown:
        raise MetricsError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRIC_NAMES)}")
    keys, gen_tokens, ref_tokens = _tokenized(generated, references, tokenize)
    scores: dict[str, float] = {}
    if any(name.startswith("BLEU") for name in wanted):
        from pycocoevalcap.bleu.bleu import Bleu

        with contextlib.redirect_stdout(io.StringIO()):  # the BLEU scorer prints its length statistics
            bleu, _ = Bleu(4).compute_score(ref_tokens, gen_tokens, verbose=0)
        for n in range(1, 5):
            if f"BLEU-{n}" in wanted:
                scores[f"BLEU-{n}"] = 100.0 * float(bleu[n - 1])
    if "METEOR" in wanted:
        scores["METEOR"] = 100.0 * meteor(ref_tokens, gen_tokens)
    if "ROUGE-L" in wanted:
        from pycocoevalcap.rouge.rouge import Rouge

        scores["ROUGE-L"] = 100.0 * float(Rouge().compute_score(ref_tokens, gen_tokens)[0])
    if "CIDEr-D" in wanted:
        from pycocoevalcap.cider.cider import Cider

        scores["CIDEr-D"] = 100.0 * float(Cider().compute_score(ref_tokens, gen_tokens)[0])
    return {name: scores[name] for name in METRIC_NAMES if name in scores}


def _tokenized(generated: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], tokenize: bool) -> tuple[list, dict, dict]:
    """(keys in order, {i: [caption tokens]}, {i: [reference tokens, ...]}), checked for matching images."""
    generated_keys, reference_keys = set(generated), set(references)
    if not generated_keys:
        raise MetricsError("nothing to score: no generated captions")
    if generated_keys != reference_keys:
        missing = len(generated_keys - reference_keys)
        extra = len(reference_keys - generated_keys)
        raise MetricsError(f"generated captions and references are for different images ({missing} without references, {extra} without a caption)")
    keys = list(generated)
    for key in keys:
        if isinstance(references[key], str) or not references[key]:
            raise MetricsError(f"image {key!r} has no reference captions (a list of strings is needed)")
    if tokenize:
        flat = [str(generated[key]) for key in keys] + [str(r) for key in keys for r in references[key]]
        tokens = ptb_tokenize(flat)
        gen_tokens, position = {}, len(keys)
        ref_tokens = {}
        for i, key in enumerate(keys):
            gen_tokens[i] = [tokens[i]]
            count = len(references[key])
            ref_tokens[i] = tokens[position : position + count]
            position += count
    else:
        gen_tokens = {i: [" ".join(str(generated[key]).split())] for i, key in enumerate(keys)}
        ref_tokens = {i: [" ".join(str(r).split()) for r in references[key]] for i, key in enumerate(keys)}
    return keys, gen_tokens, ref_tokens


def cider_per_image(generated: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], *, tokenize: bool = True) -> dict[Hashable, float]:
    """Each image's CIDEr-D (0-100; their mean is the corpus score), for intervals over resampled images."""
    from pycocoevalcap.cider.cider import Cider

    keys, gen_tokens, ref_tokens = _tokenized(generated, references, tokenize)
    _, per_image = Cider().compute_score(ref_tokens, gen_tokens)
    return {key: 100.0 * float(value) for key, value in zip(keys, per_image)}


def meteor(references: Mapping[int, list[str]], generated: Mapping[int, list[str]]) -> float:
    """Corpus METEOR 1.5 (pycocoevalcap's jar and protocol); the JVM is stopped before returning."""
    jar = _package_file("meteor.meteor", "meteor-1.5.jar")
    command = [_java(), "-jar", "-Xmx2G", str(jar), "-", "-", "-stdio", "-l", "en", "-norm"]
    with _METEOR_LOCK:
        process = subprocess.Popen(command, cwd=jar.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            stats = []
            for key in generated:
                hypothesis = generated[key][0].replace("|||", "").strip()
                refs = [r.replace("|||", "").strip() for r in references[key]]
                process.stdin.write(("SCORE ||| " + " ||| ".join(refs) + " ||| " + hypothesis + "\n").encode("utf-8"))  # type: ignore[union-attr]
                process.stdin.flush()  # type: ignore[union-attr]
                line = process.stdout.readline().decode().strip()  # type: ignore[union-attr]
                if not line:
                    raise MetricsError("METEOR stopped answering (is there enough memory for a 2 GB JVM?)")
                stats.append(line)
            process.stdin.write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode())  # type: ignore[union-attr]
            process.stdin.flush()  # type: ignore[union-attr]
            for _ in stats:  # one score per image, then the corpus score
                process.stdout.readline()  # type: ignore[union-attr]
            return float(process.stdout.readline().decode().strip())  # type: ignore[union-attr]
        except (BrokenPipeError, ValueError) as error:
            raise MetricsError(f"METEOR failed: {error}") from None
        finally:
            if process.stdin:
                process.stdin.close()
            process.kill()
            process.wait()
            for stream in (process.stdout,):
                if stream:
                    stream.close()


def java_available() -> bool:
    return shutil.which("java") is not None


__all__ = ["METRIC_NAMES", "MetricsError", "cider_per_image", "java_available", "meteor", "ptb_tokenize", "score_captions"]
