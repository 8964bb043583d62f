# Preprocessing: one job per (dataset, shard) writes its images into the blosc2 store under
# results/preprocessed/{dataset}/sub-*/ses-*/ and lists them in a shard manifest (the images of
# a shard are known only from the data, so the manifest is the declared output). The shard job is a
# checkpoint: once it has run, `all` reads its manifest and lists the store files it names that no
# longer exist; `preprocess_image` re-makes such a file (or any one named as a target) alone, checked
# against the manifest, and nothing downstream depends on it, so finished runs are not redone.
# Logic lives in openmind_bench.preprocess; `openmind-bench preprocess` is the same stage outside Snakemake.


checkpoint preprocess_shard:
    input:
        index=preprocess_index_tables,
    output:
        manifest=f"{PREPROCESS_ROOT}/{{dataset}}/shard-{{shard}}.tsv",
        rejected="results/qc/parts/preprocess/{dataset}/{shard}.tsv",
    params:
        out_root=subpath(output.manifest, ancestor=2),
        settings=config["preprocess"],
    resources:
        mem_mb=config["resources"]["preprocess"]["mem_mb"],
        runtime=config["resources"]["preprocess"]["runtime"],
    log:
        "logs/preprocess/{dataset}/{shard}.log",
    benchmark:
        "logs/benchmarks/preprocess/{dataset}/{shard}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/preprocess_shard.py"


# ancient(): the shard wrote the image before its manifest, and a newer input (a re-made mask, a newer
# index) does not make an existing image out of date: a shard whose inputs changed runs again as a whole.
rule preprocess_image:
    input:
        index=ancient(preprocess_index_tables),
        manifest=ancient(preprocess_manifest_of_image),
        masks=ancient(preprocess_masks_of_image),
    output:
        image=f"{PREPROCESS_IMAGE_STEM}.b2nd",
        anon=f"{PREPROCESS_IMAGE_STEM}__anon.b2nd",
        anat=f"{PREPROCESS_IMAGE_STEM}__anat.b2nd",
        properties=f"{PREPROCESS_IMAGE_STEM}.json",
        nnssl_properties=f"{PREPROCESS_IMAGE_STEM}.pkl",
    params:
        out_root=subpath(output.image, ancestor=4),
        settings=config["preprocess"],
    resources:
        mem_mb=config["resources"]["preprocess"]["mem_mb"],
        runtime=config["resources"]["preprocess"]["runtime"],
    log:
        "logs/preprocess/{dataset}/{subject_dir}/{session_dir}/{image_id}.log",
    benchmark:
        "logs/benchmarks/preprocess/{dataset}/{subject_dir}/{session_dir}/{image_id}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/preprocess_image.py"
