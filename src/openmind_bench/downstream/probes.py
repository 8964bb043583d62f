"""Linear and k-NN probes of a frozen encoder on a classification dataset: as fine-tuning runs
(schedules `linear_probe` and `knn`) and, every `pretrain.probe_every` epochs, inside pre-training.

A probe never trains the network. Every case's centre patch (the classification protocol's test-time
crop, at the run's spacing) goes once through the encoder; the mean over the deepest stage's voxels
(ResEnc) or over the tokens (Primus) is its feature vector, the input of the classification head of
fine-tuning (`classification.PooledEncoderClassifier`). On these vectors scikit-learn fits

- `linear_probe`: standardised features, L2-regularised logistic regression with balanced class
  weights; C from a log grid (`downstream.probes.logistic_cs` values in 1e-4..1e4) chosen by
  stratified cross-validation over the training cases alone, scored by balanced accuracy
  (`LogisticRegressionCV`); fewer than two cases in a class: C = 1, no search;
- `knn`: L2-normalised features, the `knn_k` nearest training cases by cosine distance, votes weighted
  by inverse distance (the k-NN monitor of self-supervised learning, as DINO's k = 20).

As fine-tuning runs (`{pretrain run}__linear_probe__{epochs}`; the epochs part keeps the naming, a
probe trains no epochs) they read the same split and fold as fine-tuning, fit on its training cases
and score its evaluation cases with the same metrics (`metrics.json` in the aggregation shape): their
rows sit in the tables beside the schedules. The features are cached per case in the run's folder
(`features.npz`, keyed by the checkpoint's sha256, the patch and the spacing), so a rerun computes
only what is missing. Probes apply to classification datasets only: a segmentation dataset with a
probe schedule is no target of the workflow (`settings.targets`), and a job asked for one fails.

During pre-training (`TrainingProbe`) the main rank copies the current encoder into a network of its
own, extracts the features of the training cases of each probe dataset's split (never its test
cases) and scores each probe by out-of-fold predictions (stratified folds over those cases). All of
it runs under saved process-wide random states, in eval mode and without gradients, on a copy of the
weights: the run's random stream, weights and results are those of the run without probes. A probe
that fails (an unreadable case) is logged and skipped; pre-training goes on.

This module imports neither torch nor scikit-learn at import time: the workflow validates the probe
settings when it builds the DAG.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from openmind_bench import atomic
from openmind_bench.config import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

LINEAR, KNN = "linear_probe", "knn"
PROBES = (LINEAR, KNN)
FEATURES_FILE = "features.npz"
_TAG_INIT = 11  # the classification engine's: a probe run builds the same network as its fine-tuning
_LOG_C_RANGE = (-4.0, 4.0)  # scikit-learn's LogisticRegressionCV grid for an integer Cs


def is_probe(schedule: str | None) -> bool:
    return schedule in PROBES


# ---------------------------------------------------------------- features
def pooled_features(backbone, image: "torch.Tensor") -> "torch.Tensor":
    """(N, width): the mean of the encoder's deepest features (ResEnc: over voxels; Primus: over tokens)."""
    if hasattr(backbone, "eva"):
        from openmind_bench.nets.primus import embed_tokens, run_eva

        return run_eva(backbone.eva, embed_tokens(backbone, image)).mean(dim=1)
    return backbone.encoder(image)[-1].mean(dim=(2, 3, 4))


def case_patch(case, patch_size: Sequence[int], spacing: Sequence[float] | None) -> np.ndarray:
    """The case's centre patch at `spacing` (C, X, Y, Z), as fine-tuning evaluates it."""
    from openmind_bench.downstream import volumes

    return volumes.centre_crop(volumes.load_case(case, spacing).image, patch_size).numpy()


def extract(backbone, cases: Sequence, patch_size: Sequence[int], spacing: Sequence[float] | None,
            device) -> np.ndarray:
    """(cases, width) float64 features of `cases`, one forward pass each, without gradients in eval
    mode (the caller's mode is given back)."""
    import torch

    was_training = backbone.training
    backbone.eval()
    rows = []
    try:
        with torch.no_grad():
            for case in cases:
                image = torch.as_tensor(case_patch(case, patch_size, spacing))[None].float().to(device)
                rows.append(pooled_features(backbone, image).double().cpu().numpy()[0])
    finally:
        backbone.train(was_training)
    return np.stack(rows) if rows else np.zeros((0, 0))


def cached_features(path: Path, key: dict, backbone, cases: Sequence, patch_size, spacing, device) -> np.ndarray:
    """Features of `cases` from `path` where it holds them under `key`, the others computed and added
    (written atomically)."""
    key_text = json.dumps(key, sort_keys=True)
    known: dict[str, np.ndarray] = {}
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as saved:
                if str(saved["key"]) == key_text:
                    known = dict(zip([str(i) for i in saved["case_ids"]], saved["features"]))
        except (OSError, ValueError, KeyError) as e:
            log.warning("feature cache %s unreadable (%s): computing anew", path, e)
    missing = [c for c in cases if c.case_id not in known]
    if missing:
        log.info("features of %d case(s) (%d cached)", len(missing), len(cases) - len(missing))
        known.update(zip([c.case_id for c in missing], extract(backbone, missing, patch_size, spacing, device)))
        ids = sorted(known)
        with atomic.atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, key=np.array(key_text), case_ids=np.array(ids), features=np.stack([known[i] for i in ids]))
    return np.stack([known[c.case_id] for c in cases])


# ---------------------------------------------------------------- the probes (scikit-learn)
def _folds(labels: np.ndarray, wanted: int) -> int:
    """Stratified folds the labels allow: at most `wanted`, at most the smallest class's count."""
    return int(min(wanted, np.bincount(labels).min())) if len(labels) else 0


def make_probe(kind: str, labels: np.ndarray, config: dict, seed: int, c: float | None = None):
    """The unfitted scikit-learn pipeline of probe `kind` for training labels `labels` (config:
    `downstream.probes`); `c`: the logistic regression's C, fixed (no search)."""
    from sklearn.model_selection import StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    if kind == KNN:
        k = max(1, min(int(config["knn_k"]), len(labels)))
        return make_pipeline(Normalizer(), KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="distance"))
    if kind != LINEAR:
        raise ValueError(f"unknown probe {kind!r} (known: {list(PROBES)})")
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

    folds = _folds(np.unique(labels, return_inverse=True)[1], int(config["cv_folds"]))
    if c is not None or folds < 2:  # (a class with one case: no stratified search possible, C = 1)
        model = LogisticRegression(C=1.0 if c is None else float(c), class_weight="balanced",
                                   max_iter=int(config["max_iter"]))
    else:
        model = LogisticRegressionCV(
            Cs=np.logspace(*_LOG_C_RANGE, int(config["logistic_cs"])), l1_ratios=(0.0,), class_weight="balanced",
            cv=StratifiedKFold(folds, shuffle=True, random_state=seed), scoring="balanced_accuracy",
            max_iter=int(config["max_iter"]), use_legacy_attributes=False)
    return make_pipeline(StandardScaler(), model)


def _check_classes(labels: np.ndarray, where: str) -> None:
    if len(np.unique(labels)) < 2:
        raise ValueError(f"{where}: a probe needs training cases of at least two classes, got "
                         f"{len(labels)} case(s) of class(es) {sorted(set(labels.tolist()))}")


def class_probabilities(model, features: np.ndarray, n_classes: int) -> np.ndarray:
    """(cases, n_classes) probabilities, zero for classes absent from the training cases."""
    out = np.zeros((len(features), n_classes))
    out[:, model.classes_] = model.predict_proba(features)
    return out


def fit_and_predict(kind: str, train_x: np.ndarray, train_y: np.ndarray, eval_x: np.ndarray, n_classes: int,
                    config: dict, seed: int, where: str = "probe", c: float | None = None) -> tuple[np.ndarray, dict]:
    """(evaluation probabilities, what was chosen) of probe `kind` fitted on the training features."""
    model, chosen = fit(kind, train_x, train_y, config, seed, where, c)
    return class_probabilities(model, eval_x, n_classes), chosen


def fit(kind: str, train_x: np.ndarray, train_y: np.ndarray, config: dict, seed: int, where: str = "probe",
        c: float | None = None):
    """(fitted pipeline, what was chosen: the probe, cases, feature width, C or k)."""
    train_y = np.asarray(train_y, dtype=int)
    _check_classes(train_y, where)
    model = make_probe(kind, train_y, config, seed, c).fit(train_x, train_y)
    final = model[-1]
    chosen = {"probe": kind, "training_cases": int(len(train_y)), "feature_width": int(train_x.shape[1])}
    if kind == KNN:
        chosen["k"] = int(final.n_neighbors)
    else:
        chosen["C"] = float(np.ravel(final.C_)[0]) if hasattr(final, "C_") else float(final.C)
    return model, chosen


def out_of_fold(kind: str, features: np.ndarray, labels: np.ndarray, n_classes: int, config: dict, seed: int,
                where: str = "probe") -> np.ndarray:
    """Every case's probabilities from a probe fitted on the other folds (stratified, `cv_folds` at
    most): a score of the features that never looks at a test case. The logistic regression's C is
    searched once on all the cases, then fixed in the folds: a nested search costs `cv_folds` times
    more fits (seconds per pass even at the demo's 12 cases on a loaded CPU), for a small optimism
    of one value chosen from `logistic_cs`."""
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels, dtype=int)
    _check_classes(labels, where)
    folds = _folds(np.unique(labels, return_inverse=True)[1], int(config["cv_folds"]))
    if folds < 2:
        raise ValueError(f"{where}: cross-validated probe scores need two cases of every class, got "
                         f"{np.bincount(labels).tolist()}")
    c = fit(kind, features, labels, config, seed, where)[1]["C"] if kind == LINEAR else None
    out = np.zeros((len(labels), n_classes))
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(features, labels):
        out[test] = fit_and_predict(kind, features[train], labels[train], features[test], n_classes, config, seed,
                                    where, c)[0]
    return out


# ---------------------------------------------------------------- probe runs of the fine-tuning stage
def run(settings) -> str:
    """A `linear_probe` / `knn` run (`downstream.settings.FinetuneSettings`): features of the split's
    training and evaluation cases, the probe fitted on the first, `metrics.json` of the second."""
    import torch

    from openmind_bench.downstream import classification, inference, settings as run_settings, splits
    from openmind_bench.downstream.readers import read_dataset
    from openmind_bench.engine.record import prepare_run_dir
    from openmind_bench.engine.step import derive_seed
    from openmind_bench.metrics import classification_document
    from openmind_bench.names import parse_run
    from openmind_bench.registry import load_registry

    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = parse_run(settings.run)
    if not is_probe(name.schedule) or not name.pretrained:
        raise ValueError(f"run {name}: not a probe run ({list(PROBES)} of a pre-trained checkpoint)")
    if not settings.checkpoint:
        raise ValueError(f"run {name} probes a pre-trained encoder but no checkpoint was given")
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    spec = load_registry(settings.registry, settings.root).get(settings.dataset)
    if spec.task != "cls":
        raise ValueError(f"dataset {spec.name} is a {spec.task} dataset: probes ({name.schedule}) classify; "
                         "the workflow runs them on classification datasets only")
    data = read_dataset(spec, verify_files=False)  # training_cases checks the files against the split's record
    train_cases, eval_cases = splits.training_cases(settings, data, name)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.time()
    # the record of the run's settings and inputs (sha256 of checkpoint, split, subset) beside its results,
    # as the launcher writes it for training runs; the feature cache keeps its own key
    record = run_settings.run_record(settings)
    prepare_run_dir(out, record, state=("metrics.csv",), label=f"probe {name}")
    torch.manual_seed(derive_seed(settings.seed, _TAG_INIT))
    net, _, patch, loaded = classification.build_model(settings, spec, name)
    net = net.to(device)
    settings.write(out / "settings.json")
    key = {"checkpoint_sha256": record.inputs["checkpoint"]["sha256"],
           "patch_size": [int(p) for p in patch], "spacing": settings.spacing, "transferred_tensors": len(loaded)}
    features = cached_features(out / FEATURES_FILE, key, net.backbone, [*train_cases, *eval_cases], patch,
                               settings.spacing, device)
    train_x, eval_x = features[:len(train_cases)], features[len(train_cases):]
    feature_seconds = time.time() - started
    probabilities, chosen = fit_and_predict(
        name.schedule, train_x, np.array([int(c.target) for c in train_cases]), eval_x, len(spec.labels),
        settings.probes, settings.seed, where=f"run {name} on {spec.name} fold {settings.fold}")
    doc = classification_document(
        inference.identity(spec.name, name, settings.fold, settings.external_checkpoint),
        [c.case_id for c in eval_cases], [int(c.target) for c in eval_cases], probabilities, spec.class_names)
    doc.update(training={**chosen, "patch_size": [int(p) for p in patch], "feature_seconds": round(feature_seconds, 3),
                         "seconds": round(time.time() - started, 3)},
               run_record=record.summary())
    inference.write(doc, out)
    log.info("%s on %s fold %s: %s, balanced accuracy %.3f", name, spec.name, settings.fold, chosen,
             doc["summary"]["balanced_accuracy"])
    return "finished"


# ---------------------------------------------------------------- probes during pre-training
def training_probe_config(config: dict) -> dict | None:
    """The resolved probe settings of the pre-training runs (None when `pretrain.probe_every` is 0 or
    null): datasets with their split files, probes, spacing, probe hyperparameters. Errors name the
    config key (torch-free: the workflow calls it at start-up)."""
    from openmind_bench.downstream import settings as run_settings
    from openmind_bench.registry import RegistryError

    section = config["pretrain"]
    if not section.get("probe_every"):
        return None
    registry = run_settings.cached_registry(config)
    chosen = section.get("probe_datasets")
    if chosen is None:
        first = registry.names(task="cls")[:1]
        if not first:
            raise ConfigError("config key 'pretrain.probe_datasets': null asks for the first classification dataset "
                              f"of the registry {registry.path}, which has none; name one or set pretrain.probe_every: 0")
        chosen, key = first, "downstream_registry"
    else:
        key = "pretrain.probe_datasets"
    if not chosen:
        raise ConfigError("config key 'pretrain.probe_datasets': empty; name a classification dataset or set "
                          "pretrain.probe_every: 0")
    datasets = []
    for i, dataset in enumerate(chosen):
        where = f"{key}[{i}]" if key != "downstream_registry" else key
        try:
            spec = registry.get(dataset)  # a one-class entry is a registry error: its message says so
        except RegistryError as e:
            raise ConfigError(f"config key '{where}': probe dataset {dataset!r}: {e}") from None
        if spec.task != "cls":
            raise ConfigError(f"config key '{where}': probe dataset {dataset!r} is a {spec.task} dataset; "
                              "probes classify (name a classification dataset)")
        if not config["downstream"]["build_demo"] and not spec.source.is_dir():
            raise ConfigError(f"config key '{where}': probe dataset {dataset!r} has no folder {spec.source} "
                              f"(registry {registry.path}, under downstream.root)")
        datasets.append({"name": dataset, "split": run_settings.split_path(config, dataset)})
    return {"every": int(section["probe_every"]), "probes": list(section["probes"]), "datasets": datasets,
            "registry": run_settings.registry_path(config), "root": config["downstream"]["root"],
            "spacing": config["finetune"]["spacing"], "settings": dict(config["downstream"]["probes"]),
            "seed": int(config["finetune"]["seed"])}
