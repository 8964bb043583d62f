"""Patient-grouped, balanced train/test splits (and k folds for development sets), solved once.

Every dataset gets one fixed train/test split (the papers: 80/20); development sets also get k
folds over their training part. Cases of one subject always land in the same part. Within that,
the parts are balanced as an integer program (pulp + CBC):

- subjects with identical counts are interchangeable, so the variables say how many subjects of
  each such kind go to each part (few integers instead of one binary per subject and part: CBC
  solves a thousand subjects in about a second); which subjects of a kind those are is a shuffle
  seeded by `seed`;
- balanced counts, per part: cases; cases per site; per classification label; per segmentation
  label the cases where it is present and, among those, the cases in each volume tertile
  (`volume_bins`) of that label (so small and large lesions spread evenly);
- hard constraints: every part within m cases of its share of every count above (m = the largest
  number of cases one subject has: one subject moves at most m of any count) and no empty part.
  If the data cannot meet them they are relaxed to the objective alone, with a warning and
  `balance_constraints: relaxed` in the file;
- objective: the sum of |count - share| over counts and parts, each divided by the count's total
  (the case count weighted 5x). No part can beat its share's rounding distance, which bounds
  the deviations from below, so CBC stops as soon as a split reaches that bound; otherwise after
  `max_nodes` branch-and-bound nodes (single thread: deterministic, unlike a time limit).

The split is written once (`ensure_split`) and reused: an existing file is read back and checked
against the dataset's cases, never drawn again; a dataset whose cases changed is an error naming
the file, so a changed dataset cannot silently change a benchmark's test set. Low-data subsets
(N training cases) are drawn the same way, from the training part, into their own files.

A split made by `split_dataset` records size and mtime of every file under it (`case_files`,
`dataset_files`: the files its checks passed); a fine-tuning job checks its split's files against
that record before it trains or predicts (`check_case_files`) and refuses files changed since. In
the workflow the split rule's params carry `readers.data_fingerprint`, so a changed file re-runs the
split (and its checks) first.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pulp

from openmind_bench import atomic, config

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CASES = "cases"


class SplitError(ValueError):
    """A split that cannot be made, or a stored split that no longer fits its dataset."""


_DEFAULTS = config.section("downstream")


@dataclass(frozen=True)
class SplitSettings:
    """From the `downstream` config section (`downstream.settings.split_settings`); the field
    defaults are the schema's, read from it."""

    test_fraction: float = _DEFAULTS["test_fraction"]
    folds: int = _DEFAULTS["folds"]  # k folds over the training part of development sets; 0: none
    seed: int = _DEFAULTS["split_seed"]
    volume_bins: int = _DEFAULTS["volume_bins"]
    # CBC branch-and-bound node limit: bounds the time, keeps the result deterministic
    max_nodes: int = _DEFAULTS["split_max_nodes"]

    def __post_init__(self):
        if not 0 < self.test_fraction < 1:
            raise SplitError(f"test_fraction must lie in (0, 1), got {self.test_fraction}")
        if self.folds < 0 or self.folds == 1:
            raise SplitError(f"folds must be 0 (none) or >= 2, got {self.folds}")
        if self.volume_bins < 1:
            raise SplitError(f"volume_bins must be >= 1, got {self.volume_bins}")


def balance_features(cases: pd.DataFrame, volume_bins: int = 3) -> pd.DataFrame:
    """Per case (index) the 0/1 counts a split balances (see the module doc)."""
    if "case" not in cases.columns or "subject" not in cases.columns:
        raise SplitError(f"the case table needs columns case and subject, has {list(cases.columns)}")
    if cases.case.duplicated().any():
        raise SplitError(f"case ids repeat: {sorted(set(cases.case[cases.case.duplicated()]))[:5]}")
    table = cases.set_index("case")
    out = pd.DataFrame({CASES: 1}, index=table.index)
    if "site" in table.columns:
        sites = table.site.fillna("").astype(str)
        if sites.nunique() > 1:
            for site in sorted(sites.unique()):
                out[f"site={site}"] = (sites == site).astype(int)
    if "label" in table.columns:
        for label in sorted(table.label.unique(), key=str):
            out[f"label={label}"] = (table.label == label).astype(int)
    for column in [c for c in table.columns if c.startswith("present:")]:
        name = column.split(":", 1)[1]
        present = table[column].astype(int) > 0
        out[column] = present.astype(int)
        volume = table.get(f"volume_ml:{name}")
        if volume is None or volume_bins < 2 or present.sum() < volume_bins:
            continue
        ranks = volume[present].rank(method="first")  # equal-count bins, ties broken by case order
        bins = np.minimum(((ranks - 1) * volume_bins // present.sum()).astype(int), volume_bins - 1)
        for b in range(volume_bins):
            out[f"volume{b}:{name}"] = 0
            out.loc[bins.index[bins == b], f"volume{b}:{name}"] = 1
    return out


def _solve(groups: pd.DataFrame, fractions: Sequence[float], seed: int, max_nodes: int, what: str,
           size_slack: float | None = None) -> tuple[dict[str, int], bool]:
    """subject -> part, and whether the hard balance constraints held. `groups`: one row per
    subject, columns = summed features (CASES first).

    Subjects with identical feature rows are interchangeable, so the program decides how many of
    each kind go to each part (few integer variables, no symmetric twins for CBC to wade through);
    which subjects of a kind those are is a seeded shuffle.
    """
    subjects = list(groups.index)
    n_parts = len(fractions)
    largest = int(groups[CASES].max())
    total_cases = int(groups[CASES].sum())
    if total_cases < n_parts or len(subjects) < n_parts:
        raise SplitError(f"{what}: {len(subjects)} subject(s) with {total_cases} case(s) cannot fill {n_parts} parts")
    totals = groups.sum()
    features = [f for f in groups.columns if totals[f] > 0]
    kinds = groups[features].astype(int).apply(tuple, axis=1)
    members: dict[tuple, list[str]] = {}
    for subject, kind in zip(subjects, kinds):
        members.setdefault(kind, []).append(subject)
    kind_list = sorted(members)
    values = np.array(kind_list, dtype=float)  # kinds x features
    counts = [len(members[k]) for k in kind_list]
    equal_parts = all(abs(f - fractions[0]) < 1e-12 for f in fractions)

    def model(hard: bool):
        prob = pulp.LpProblem("split", pulp.LpMinimize)
        y = {(t, p): pulp.LpVariable(f"y_{t}_{p}", lowBound=0, upBound=counts[t], cat="Integer")
             for t in range(len(kind_list)) for p in range(n_parts)}
        for t in range(len(kind_list)):
            prob += pulp.lpSum(y[t, p] for p in range(n_parts)) == counts[t]
        objective = []
        part_cases = []
        for j, feature in enumerate(features):
            weight = (5.0 if feature == CASES else 1.0) / float(totals[feature])
            for p, fraction in enumerate(fractions):
                share = fraction * float(totals[feature])
                count = pulp.lpSum(values[t, j] * y[t, p] for t in range(len(kind_list)) if values[t, j])
                # counts are integers, so no part can come closer to a share than its rounding
                # distance; as a bound this lets CBC stop once a split reaches it
                dev = pulp.LpVariable(f"d_{j}_{p}", lowBound=abs(share - round(share)))
                prob += dev >= count - share
                prob += dev >= share - count
                objective.append(weight * dev)
                if feature == CASES:
                    prob += dev <= (size_slack if size_slack is not None else largest)
                    prob += count >= 1
                    part_cases.append(count)
                elif hard:
                    prob += dev <= largest
        if equal_parts:  # interchangeable parts: order them by size so CBC does not explore their permutations
            for p in range(n_parts - 1):
                prob += part_cases[p] >= part_cases[p + 1]
        prob += pulp.lpSum(objective)
        return prob, y

    for hard in (True, False):
        with warnings.catch_warnings():
            # pulp 3.x announces its 4.0 API (LpVariable, PULP_CBC_CMD); these calls work from 2.7 on
            warnings.simplefilter("ignore", DeprecationWarning)
            prob, y = model(hard)
            prob.solve(pulp.PULP_CBC_CMD(msg=False, threads=1, maxNodes=max_nodes))
        feasible = prob.status == pulp.LpStatusOptimal or prob.sol_status == pulp.LpSolutionIntegerFeasible
        if not feasible:
            if hard:
                continue
            raise SplitError(f"{what}: no split gives every part its share of cases within "
                             f"{size_slack if size_slack is not None else largest} "
                             f"(solver status {pulp.LpStatus[prob.status]})")
        if not hard:
            log.warning("%s: the balance constraints (every count within %d case(s) of its share) cannot all "
                        "hold; balanced by the objective alone", what, largest)
        rng = np.random.default_rng(seed)
        assignment = {}
        for t, kind in enumerate(kind_list):
            order = [members[kind][i] for i in rng.permutation(counts[t])]
            start = 0
            for p in range(n_parts):
                n = int(round(y[t, p].value() or 0))
                for subject in order[start:start + n]:
                    assignment[subject] = p
                start += n
            if start != counts[t]:
                raise SplitError(f"{what}: the solver placed {start} of {counts[t]} subjects of one kind")
        return assignment, hard
    raise AssertionError("unreachable")


def _grouped(cases: pd.DataFrame, features: pd.DataFrame) -> pd.DataFrame:
    subjects = cases.set_index("case").subject.astype(str)
    return features.groupby(subjects.reindex(features.index).to_numpy()).sum().sort_index()


def _report(features: pd.DataFrame, parts: dict[str, list[str]], fractions: dict[str, float]) -> dict:
    totals = features.sum()
    report = {}
    for feature in features.columns:
        if totals[feature] == 0:
            continue
        report[feature] = {part: {"count": int(features.loc[ids, feature].sum()),
                                  "share": round(fractions[part] * float(totals[feature]), 3)}
                           for part, ids in parts.items()}
    return report


def make_split(cases: pd.DataFrame, dataset: str, role: str, settings: SplitSettings = SplitSettings()) -> dict:
    """The split document of one dataset (see the module doc); `cases` as `readers.case_table`.
    Test-role datasets get the fixed split only (no folds), whatever `settings.folds` says."""
    if role != "dev":
        settings = replace(settings, folds=0)
    features = balance_features(cases, settings.volume_bins)
    subjects = cases.set_index("case").subject.astype(str)
    groups = _grouped(cases, features)
    fractions = [1.0 - settings.test_fraction, settings.test_fraction]
    assignment, hard = _solve(groups, fractions, settings.seed, settings.max_nodes, f"dataset {dataset} train/test")
    test = sorted(c for c in features.index if assignment[subjects[c]] == 1)
    train = sorted(c for c in features.index if assignment[subjects[c]] == 0)
    doc = {
        "format_version": FORMAT_VERSION, "dataset": dataset, "role": role, "settings": asdict(settings),
        "n_cases": len(features), "n_subjects": int(groups.shape[0]),
        "train": train, "test": test,
        "balance_constraints": "hard" if hard else "relaxed",
        "balance": {"test": _report(features, {"train": train, "test": test},
                                    {"train": fractions[0], "test": fractions[1]})},
    }
    if role == "dev" and settings.folds:
        train_cases = cases[cases.case.isin(train)]
        train_features = balance_features(train_cases, settings.volume_bins)
        k = settings.folds
        fold_of, hard_folds = _solve(_grouped(train_cases, train_features), [1.0 / k] * k, settings.seed + 1,
                                     settings.max_nodes, f"dataset {dataset} {k} folds")
        val = [sorted(c for c in train if fold_of[subjects[c]] == f) for f in range(k)]
        doc["folds"] = [{"train": sorted(set(train) - set(v)), "val": v} for v in val]
        doc["balance_constraints_folds"] = "hard" if hard_folds else "relaxed"
        doc["balance"]["folds"] = _report(train_features, {f"fold_{f}": v for f, v in enumerate(val)},
                                          {f"fold_{f}": 1.0 / k for f in range(k)})
    return doc


def _check_cases(doc: dict, cases: pd.DataFrame, path: Path) -> None:
    stored = set(doc.get("train", [])) | set(doc.get("test", []))
    current = set(cases.case)
    if stored != current:
        gone, new = sorted(stored - current), sorted(current - stored)
        raise SplitError(
            f"split {path} was made for other cases of dataset {doc.get('dataset')!r}: "
            f"{len(gone)} no longer present (e.g. {gone[:3]}), {len(new)} new (e.g. {new[:3]}). "
            "It is never redrawn automatically: delete the file to make a new split on purpose"
        )


def read_split(path: str | Path) -> dict:
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SplitError(f"split {path} cannot be read: {e}") from None
    for key in ("dataset", "train", "test"):
        if key not in doc:
            raise SplitError(f"split {path} has no {key!r}")
    overlap = set(doc["train"]) & set(doc["test"])
    if overlap:
        raise SplitError(f"split {path}: case(s) {sorted(overlap)[:3]} are in train and test")
    return doc


def ensure_split(path: str | Path, cases: pd.DataFrame, dataset: str, role: str,
                 settings: SplitSettings = SplitSettings(), files: dict | None = None) -> dict:
    """The split at `path`: read and checked if it exists, else made and written (atomically), with
    `files` (`readers.case_file_record`: the files its cases were checked on) when given."""
    path = Path(path)
    if path.exists():
        doc = read_split(path)
        if doc["dataset"] != dataset:
            raise SplitError(f"split {path} belongs to dataset {doc['dataset']!r}, not {dataset!r}")
        _check_cases(doc, cases, path)
        if doc.get("settings") and doc["settings"] != asdict(settings):
            log.info("split %s was made with settings %s; kept as it is (current settings %s)",
                     path, doc["settings"], asdict(settings))
        return doc
    doc = make_split(cases, dataset, role, settings)
    if files is not None:
        doc.update(files)
    atomic.write_json(path, doc)
    log.info("dataset %s: split written to %s (%d train, %d test%s)", dataset, path, len(doc["train"]),
             len(doc["test"]), f", {len(doc['folds'])} folds" if "folds" in doc else "")
    return doc


def all_cases(doc: dict) -> list[str]:
    """Every case a split uses (its folds divide the training part)."""
    return sorted({*doc["train"], *doc["test"]})


def partition(doc: dict, fold: int | str) -> tuple[list[str], list[str]]:
    """(training cases, evaluation cases) of `fold`: `test` (the fixed test split) or a fold index."""
    if str(fold) == "test":
        return list(doc["train"]), list(doc["test"])
    folds = doc.get("folds") or []
    try:
        k = int(fold)
    except ValueError:
        raise SplitError(f"dataset {doc['dataset']}: fold {fold!r} is neither 'test' nor a fold number") from None
    if not 0 <= k < len(folds):
        raise SplitError(f"dataset {doc['dataset']}: fold {k} does not exist ({len(folds)} folds in its split)")
    return list(folds[k]["train"]), list(folds[k]["val"])


def make_low_data_subset(cases: pd.DataFrame, split: dict, n: int, seed: int = 0,
                         settings: SplitSettings = SplitSettings()) -> dict:
    """N training cases of the split's training part, subject-grouped and balanced like the split."""
    train = cases[cases.case.isin(split["train"])]
    if not 1 <= n <= len(train):
        raise SplitError(f"dataset {split['dataset']}: a low-data subset of {n} case(s) needs 1..{len(train)}")
    features = balance_features(train, settings.volume_bins)
    groups = _grouped(train, features)
    largest = int(groups[CASES].max())
    if n == len(train):
        chosen = sorted(train.case)
    else:
        fraction = n / len(train)
        assignment, _ = _solve(groups, [fraction, 1.0 - fraction], seed, settings.max_nodes,
                               f"dataset {split['dataset']} low-data N={n}", size_slack=largest - 1)
        subjects = train.set_index("case").subject.astype(str)
        chosen = sorted(c for c in features.index if assignment[subjects[c]] == 0)
    return {"format_version": FORMAT_VERSION, "dataset": split["dataset"], "n": n, "seed": seed,
            "train": chosen, "from_split_train": len(train)}


def ensure_low_data_subset(path: str | Path, cases: pd.DataFrame, split: dict, n: int, seed: int = 0,
                           settings: SplitSettings = SplitSettings()) -> dict:
    """Like `ensure_split` for a low-data subset: written once, then read back and checked."""
    path = Path(path)
    if path.exists():
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise SplitError(f"low-data subset {path} cannot be read: {e}") from None
        outside = sorted(set(doc.get("train", [])) - set(split["train"]))
        if doc.get("seed") != seed:  # another seed's draw would pass for this one's
            raise SplitError(f"low-data subset {path} was drawn with seed {doc.get('seed')!r}, this run's seed is "
                             f"{seed}; delete it to draw a new one on purpose")
        if doc.get("dataset") != split["dataset"] or doc.get("n") != n or outside:
            raise SplitError(f"low-data subset {path} does not belong to dataset {split['dataset']!r} with N={n} "
                             f"and its training part{f' (cases {outside[:3]} are not in it)' if outside else ''}; "
                             "delete it to draw a new one on purpose")
        return doc
    doc = make_low_data_subset(cases, split, n, seed, settings)
    atomic.write_json(path, doc)
    return doc


def max_deviation(doc: dict, section: str = "test") -> dict[str, float]:
    """Per balanced count, the largest |count - share| over the parts of a split's `section`."""
    out = {}
    for feature, parts in doc["balance"][section].items():
        out[feature] = max(abs(v["count"] - v["share"]) for v in parts.values())
    return out


def split_dataset(registry: str | Path, root: str | Path | None, dataset: str, settings: SplitSettings, *,
                  split_out: str | Path, rejected_out: str | Path | None = None) -> dict:
    """The split of one registry dataset, made once and reused (what rule downstream_split and
    `openmind-bench downstream-splits` call); cases the reader rejects (and label images with undeclared
    values) go to `rejected_out` and stay out of the split."""
    from openmind_bench.downstream.readers import case_file_record, checked_case_table, dataset_files, read_dataset
    from openmind_bench.qc import Rejections
    from openmind_bench.registry import load_registry

    spec = load_registry(registry, root).get(dataset)
    listed = dataset_files(spec)  # before the checks: a file rewritten meanwhile will not match the record
    data, table = checked_case_table(read_dataset(spec))
    if rejected_out is not None:
        rejections = Rejections("downstream")
        data.record_rejections(rejections)
        rejections.write(rejected_out)
    return ensure_split(split_out, table, spec.name, spec.role, settings, files=case_file_record(data, listed))


def check_case_files(split: dict, split_path: str | Path, source: str | Path, case_ids) -> None:
    """Raise SplitError naming the first files (of `case_ids` and the dataset's tables, under the
    dataset folder `source`) whose size or mtime differ from the split's record: the split's checks
    (file integrity, label values) were made on other files. A split without a record (made before
    splits kept one) is not checked; a log line says so."""
    record = split.get("case_files")
    if record is None:
        log.info("split %s records no file sizes and times (an older split): the files of its cases are "
                 "not checked against it", split_path)
        return
    source = Path(source)
    wanted = dict(split.get("dataset_files") or {})
    for case in case_ids:
        wanted.update(record.get(case) or {})
    changed = []
    for name, (size, mtime_ns) in wanted.items():
        path = Path(name) if Path(name).is_absolute() else source / name
        try:
            st = path.stat()
        except OSError:
            changed.append(f"{path} is gone")
            continue
        if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
            changed.append(f"{path} changed (size {size} -> {st.st_size} bytes, mtime_ns {mtime_ns} -> "
                           f"{st.st_mtime_ns})")
    if changed:
        raise SplitError(
            f"{len(changed)} file(s) under split {split_path} changed since it was made, so its checks (file "
            f"integrity, label values) no longer hold: {'; '.join(changed[:3])}. Re-make the split: snakemake "
            f"re-runs rule downstream_split by itself (the data fingerprint in its params changed); outside "
            f"Snakemake delete {split_path}")


def ensure_run_subset(settings) -> None:
    """Draw a low-data run's subset (`settings.low_data_subset`) if no run of its N and seed has yet:
    the run's record holds the file's sha256, so it must exist before the record is taken (before
    `training_cases` reads it back). Other runs: nothing."""
    from openmind_bench.downstream.readers import case_table, read_dataset, restricted_to
    from openmind_bench.names import parse_run
    from openmind_bench.registry import load_registry

    n = parse_run(settings.run).low_data_n
    if not n or Path(settings.low_data_subset).exists():
        return
    split = read_split(settings.split)
    spec = load_registry(settings.registry, settings.root).get(settings.dataset)
    data = restricted_to(read_dataset(spec, verify_files=False), all_cases(split))
    ensure_low_data_subset(settings.low_data_subset, case_table(data), split, n, seed=settings.seed,
                           settings=SplitSettings(**settings.split_settings))


def training_cases(settings, data, name) -> tuple[list, list]:
    """(training cases, evaluation cases) of one fine-tuning run (`settings`: FinetuneSettings, `data`:
    readers.DownstreamData, `name`: names.RunName): the split's fold, reduced to the low-data subset
    for `__n{N}` runs."""
    from openmind_bench.downstream.readers import case_table

    split = read_split(settings.split)
    # every case of the split, not only this fold's: nnU-Net preprocesses them all once per dataset
    check_case_files(split, settings.split, data.spec.source, all_cases(split))
    train_ids, eval_ids = partition(split, settings.fold)
    if name.low_data_n:
        if not settings.low_data_subset:
            raise ValueError(f"run {name}: a low-data run needs low_data_subset (the subset file)")
        subset = ensure_low_data_subset(settings.low_data_subset, case_table(data), split, name.low_data_n,
                                        seed=settings.seed, settings=SplitSettings(**settings.split_settings))
        train_ids = [c for c in train_ids if c in set(subset["train"])]
    by_id = {c.case_id: c for c in data.cases}
    missing = [c for c in [*train_ids, *eval_ids] if c not in by_id]
    if missing:
        raise ValueError(f"split {settings.split} names cases dataset {data.name} no longer has: {missing[:3]}")
    return [by_id[c] for c in train_ids], [by_id[c] for c in eval_ids]
