# Source stage: the demo mirror (demo only) and one fetch job per dataset.
# Logic lives in openmind_bench.sources; `openmind-bench fetch` is the same stage outside Snakemake.


rule demo_mirror:
    input:
        # the split of the downstream set a test case of which is planted in the mirror (demo.plant_leak);
        # ancient: the split job re-runs after a registry edit without changing its test cases, and the
        # mirror (with everything after it) must not be rebuilt for that
        leak_split=ancient(demo_leak_split),
    output:
        truth=f"{config['source']['root']}/ground_truth/ground_truth.json",
    params:
        root=subpath(output.truth, ancestor=2),
        seed=config["demo"]["seed"],
        resolution=config["demo"]["resolution"],
        inject_faults=config["demo"]["inject_faults"],
        plant_duplicates=config["demo"]["plant_duplicates"],
        leak=demo_leak_settings,
    resources:
        mem_mb=config["resources"]["demo"]["mem_mb"],
        runtime=config["resources"]["demo"]["runtime"],
    log:
        "logs/demo/demo_mirror.log",
    benchmark:
        "logs/benchmarks/demo/demo_mirror.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/build_demo.py"


rule fetch_dataset:
    input:
        unpack(fetch_inputs),
    output:
        manifest="data/raw/{source}/{dataset}/download_manifest.json",
        rejected="results/qc/parts/fetch/{source}/{dataset}.tsv",
    params:
        source=config["source"],
        snapshot=snapshot_of,
        dest=subpath(output.manifest, parent=True),
    resources:
        mem_mb=config["resources"]["fetch"]["mem_mb"],
        runtime=config["resources"]["fetch"]["runtime"],
    log:
        "logs/fetch/{source}/{dataset}.log",
    benchmark:
        "logs/benchmarks/fetch/{source}/{dataset}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/fetch_dataset.py"
