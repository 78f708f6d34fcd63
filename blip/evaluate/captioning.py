"""Caption metrics with pycocoevalcap's scorers, as BLIP's ``coco_caption_eval`` (blip-facts §1.13).

``COCOEvalCap.evaluate()`` cannot run offline: SPICE is in its hard-coded scorer list and
downloads Stanford CoreNLP 3.6.0 on first use (environment.md §9). So the scorers run one by
one here, with COCOEvalCap's tokenisation (PTBTokenizer: lower-cased, punctuation dropped) and
its metric names:

``Bleu_1 .. Bleu_4``, ``METEOR`` (needs Java: ``meteor=True | False | "auto"``), ``ROUGE_L``,
``CIDEr`` (CIDEr-D, IDF from the references of the evaluated images). Values are pycocoevalcap's
own scale (fractions; the paper multiplies by 100). BLIP selects its best captioning epoch by
val ``CIDEr + Bleu_4``.

Nothing is dropped silently: every metric not computed is named, with the reason, in
``result["skipped"]`` and logged as a warning. SPICE is always there.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence

_log = logging.getLogger("blip.evaluate")

SPICE_SKIPPED = ("needs the Stanford CoreNLP 3.6.0 models, which pycocoevalcap downloads on first use; "
                 "they cannot be downloaded offline and no package registry carries them")
BLEU = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")
# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS, for the no-Java fallback
_PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                 "...", ";"}
_SIMPLE_TOKEN = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*|\.\.\.|--|[^\sa-z0-9]")


def java_available(timeout: float = 30.0) -> bool:
    """True when ``java -version`` runs (PTBTokenizer and METEOR need it)."""
    if shutil.which("java") is None:
        return False
    try:
        return subprocess.run(["java", "-version"], capture_output=True, timeout=timeout, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def simple_tokenize(captions: Mapping[object, Sequence[str]]) -> dict[object, list[str]]:
    """Python stand-in for PTBTokenizer when Java is missing: lower-case, split off punctuation,
    drop the punctuation tokens PTBTokenizer drops. Equal to it on plain captions (tested), not
    on every corner of the Penn Treebank rules (e.g. clitics, which it splits and we keep)."""
    out = {}
    for k, caps in captions.items():
        out[k] = [" ".join(t for t in _SIMPLE_TOKEN.findall(c.lower()) if t not in _PUNCTUATIONS) for c in caps]
    return out


@contextlib.contextmanager
def _meteor() -> Iterator[object]:
    from pycocoevalcap.meteor.meteor import Meteor

    m = Meteor()  # starts the JVM (~6 s)
    try:
        yield m
    finally:
        with m.lock:  # what Meteor.__del__ does, now rather than at garbage collection
            m.meteor_p.stdin.close()
            m.meteor_p.kill()
            m.meteor_p.wait()


def _meteor_score(gts, res) -> float:
    with _meteor() as m:
        try:
            score, _ = m.compute_score(gts, res)
        except ValueError as e:  # the JVM died (e.g. no memory for -Xmx2G): readline gave ""
            err = m.meteor_p.stderr.read(2000).decode(errors="replace") if m.meteor_p.poll() is not None else ""
            raise RuntimeError(f"METEOR's Java process gave no score ({e}); its stderr: {err.strip()!r}") from e
    return float(score)


def caption_metrics(
    gts: Mapping[int, Sequence[str]],
    res: Mapping[int, str],
    meteor: bool | str = "auto",
) -> dict:
    """COCO caption metrics of predictions ``res`` (image id → caption) against references
    ``gts`` (image id → captions), over the images in ``res``.

    ``meteor``: ``True`` computes METEOR (errors raise), ``False`` skips it, ``"auto"`` computes
    it when Java runs and otherwise skips it with the reason. Without Java the PTB tokenizer
    cannot run either; :func:`simple_tokenize` stands in and ``result["tokenizer"]`` says so.

    Returns ``{"Bleu_1".."Bleu_4", ["METEOR",] "ROUGE_L", "CIDEr": float, "n_images": int,
    "tokenizer": "PTBTokenizer" | "simple", "skipped": {metric: reason}}``.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if meteor not in (True, False, "auto"):
        raise ValueError(f"meteor={meteor!r}: use True, False or 'auto'")
    if not res:
        raise ValueError("no predictions to score")
    unknown = [i for i in res if i not in gts]
    if unknown:
        raise ValueError(f"{len(unknown)} predicted image ids have no reference captions, e.g. {unknown[:5]}; "
                         "predictions and ground truth must use the same image ids")
    ids = list(res)
    refs = {i: [str(c) for c in gts[i]] for i in ids}
    empty = [i for i in ids if not refs[i]]
    if empty:
        raise ValueError(f"images {empty[:5]} have no reference captions")
    hyps = {i: [str(res[i])] for i in ids}

    skipped: dict[str, str] = {"SPICE": SPICE_SKIPPED}
    java = java_available()
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        ptb = PTBTokenizer()
        g = ptb.tokenize({i: [{"caption": c} for c in refs[i]] for i in ids})
        r = ptb.tokenize({i: [{"caption": c} for c in hyps[i]] for i in ids})
        tokenizer = "PTBTokenizer"
    else:
        _log.warning("java not found: PTBTokenizer replaced by blip.evaluate.captioning.simple_tokenize")
        g, r = simple_tokenize(refs), simple_tokenize(hyps)
        tokenizer = "simple"

    out: dict = {}
    bleu, _ = Bleu(4).compute_score(g, r, verbose=0)
    out.update({name: float(v) for name, v in zip(BLEU, bleu)})
    if meteor is False:
        skipped["METEOR"] = "disabled (meteor=False)"
    elif not java:
        if meteor is True:
            raise RuntimeError("meteor=True but `java -version` does not run; install a JRE or pass meteor='auto'")
        skipped["METEOR"] = "needs Java, and `java -version` does not run here"
    else:
        try:
            out["METEOR"] = _meteor_score(g, r)
        except Exception as e:  # "auto": report any METEOR failure rather than lose the other metrics
            if meteor is True:
                raise
            skipped["METEOR"] = f"failed: {type(e).__name__}: {e}"
    out["ROUGE_L"] = float(Rouge().compute_score(g, r)[0])
    out["CIDEr"] = float(Cider().compute_score(g, r)[0])
    for name, why in skipped.items():
        _log.warning("caption metric %s skipped: %s", name, why)
    out.update(n_images=len(ids), tokenizer=tokenizer, skipped=skipped)
    return out


def load_gts(gt_json: str, image_ids: Sequence[int] | None = None) -> dict[int, list[str]]:
    """Reference captions ``image id -> [caption, ...]`` from a COCO caption-format JSON (as
    ``blip.data.gt_path(root, split)`` names it), loaded with pycocotools like BLIP does."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints its progress
        coco = COCO(gt_json)
    ids = coco.getImgIds() if image_ids is None else list(image_ids)
    return {i: [a["caption"] for a in coco.imgToAnns.get(i, [])] for i in ids}


def _gather(predictions: list[dict]) -> list[dict]:
    """Every rank's predictions (torch.distributed), in rank order; unchanged in one process."""
    from .. import dist

    if dist.world_size() == 1:
        return predictions
    import torch.distributed as tdist

    parts: list = [None] * dist.world_size()
    tdist.all_gather_object(parts, predictions)
    return [p for part in parts for p in part]


def evaluate_captioning(
    captioner,
    tokenizer,
    shards,
    gt_json: str,
    gen_cfg=None,
    batch_size: int = 32,
    device="cpu",
    meteor: bool | str = "auto",
    num_workers: int = 0,
) -> tuple[dict, list[dict]]:
    """Caption every image of ``shards`` and score the captions against ``gt_json``.

    ``captioner``: a model with ``caption`` (``BlipCaptioner``, ``BlipPretrain``); ``gen_cfg``
    defaults to BLIP's evaluation setting, beam search with 3 beams, max length 20, min 5
    (prompt included). Each prediction is keyed by the loader's ``image_id``, which is the id
    the data layer writes into the GT file (``blip/data/coco.py``). Under torch.distributed
    each rank captions its share of the shards and every rank gets all predictions and metrics.
    Images of the GT file without a prediction are left out of the metrics, as COCOEvalCap
    does, with a warning.

    Returns ``(metrics, predictions)``: :func:`caption_metrics`'s dict and BLIP's result-file
    rows ``[{"image_id": int, "caption": str}, ...]`` in loader order.
    """
    import torch

    from ..data.loader import make_loader
    from ..model.config import GenerationConfig

    gen_cfg = gen_cfg or GenerationConfig(method="beam", num_beams=3, max_length=20, min_length=5)
    was_training = captioner.training
    captioner.eval()
    predictions: list[dict] = []
    try:
        loader = make_loader(shards, batch_size=batch_size, image_size=captioner.cfg.vision.image_size, train=False,
                             num_workers=num_workers)
        with torch.no_grad():
            for batch in loader:
                caps = captioner.caption(batch["image"].to(device), tokenizer, gen_cfg)
                predictions += [{"image_id": int(i), "caption": c} for i, c in zip(batch["image_id"].tolist(), caps)]
    finally:
        captioner.train(was_training)
    predictions = _gather(predictions)
    res: dict[int, str] = {}
    for p in predictions:
        res.setdefault(p["image_id"], p["caption"])
    if len(res) < len(predictions):
        _log.warning("%d predictions repeat an image id; the first caption of each id is scored",
                     len(predictions) - len(res))
    gts = load_gts(gt_json)
    unknown = [i for i in res if i not in gts]
    if unknown:
        raise ValueError(f"{len(unknown)} images of {shards!r} are not in {gt_json}, e.g. image ids {unknown[:5]}; "
                         "caption the split the ground truth was written for")
    missing = len(gts) - len(res)
    if missing:
        _log.warning("%d of %d images in %s have no prediction (unreadable samples?); scoring the other %d",
                     missing, len(gts), gt_json, len(res))
    return caption_metrics(gts, res, meteor=meteor), predictions
