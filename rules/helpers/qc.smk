# Helpers of the qc rules (rules/qc.smk): input functions, run lists, targets.

def rejection_parts():
    """Every per-job rejection record of the stages in this run (known from config alone)."""
    data = [
        *fetch_rejection_parts(),
        *index_rejection_parts(),
        *preprocess_rejection_parts(),
        *DWI_REJECTION_PARTS,
        *masks_rejection_parts(),
        *curation_rejection_parts(),
    ]
    return [*(data if OPENMIND_DATA else []), *downstream_rejection_parts()]
