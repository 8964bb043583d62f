import math

import pytest

from openmind_bench.metadata import harmonise as h


@pytest.mark.parametrize(
    "value, unit, expected",
    [("34", "years", 34.0), ("18", "months", 1.5), ("89+", "years", 89.0), ("20-30", "years", 25.0),
     ("300m", "years", 25.0), ("25y", "months", 25.0), ("52", "weeks", 0.997), ("n/a", "years", math.nan),
     ("", "years", math.nan), ("abc", "years", math.nan), ("41,5", "years", 41.5)],
)
def test_age(value, unit, expected):
    got = h.harmonise_age(value, unit)
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected, abs=1e-3)


def test_age_unit_from_sidecar_then_name():
    assert h.age_unit("age", {"Units": "months"}) == "months"
    assert h.age_unit("age", {"Units": "y"}) == "years"
    assert h.age_unit("age_months", None) == "months"
    assert h.age_unit("age", None) == "years"


@pytest.mark.parametrize(
    "value, levels, expected",
    [("M", None, "M"), ("female", None, "F"), ("MALE", None, "M"), ("1", {"1": "male", "2": "female"}, "M"),
     ("2", {"1": "male", "2": "female"}, "F"), ("1", None, "unknown"), ("other", None, "O"), ("", None, "unknown")],
)
def test_sex(value, levels, expected):
    assert h.harmonise_sex(value, levels) == expected


@pytest.mark.parametrize("value, expected", [("R", "R"), ("left", "L"), ("ambidextrous", "A"), ("85", "R"),
                                             ("-70", "L"), ("10", "A"), ("n/a", "unknown")])
def test_handedness(value, expected):
    assert h.harmonise_handedness(value) == expected


def test_health_status():
    assert h.harmonise_health("HC") == ("healthy", "HC")
    assert h.harmonise_health("control") == ("healthy", "control")
    assert h.harmonise_health("MS") == ("patient", "MS")
    assert h.harmonise_health("n/a") == ("unknown", "")
    assert h.harmonise_health("HC", {"HC": "healthy control"})[0] == "healthy"


def test_participants_table_uses_levels_and_units():
    tsv = "participant_id\tage\tsex\tgroup\nsub-01\t24\t1\tcontrol\nsub-02\t36\t2\tAD\n"
    info = {"age": {"Units": "months"}, "sex": {"Levels": {"1": "male", "2": "female"}}}
    table = h.participants_table(tsv, info)
    assert table["01"] == {"age": 2.0, "sex": "M", "handedness": "unknown", "health_status": "healthy",
                           "diagnosis": "control"}
    assert table["02"]["sex"] == "F" and table["02"]["health_status"] == "patient"


def test_participants_table_without_id_column_fails():
    with pytest.raises(ValueError, match="participant_id"):
        h.participants_table("subject\tage\n01\t3\n", None)


def test_acquisition_units():
    fields = h.acquisition_fields({"Manufacturer": "GE MEDICAL SYSTEMS", "MagneticFieldStrength": 3000,
                                   "RepetitionTime": 2300, "EchoTime": 30, "InversionTime": 900})
    assert fields["manufacturer"] == "GE"
    assert fields["field_strength"] == 3.0
    assert fields["repetition_time"] == pytest.approx(2.3)
    assert fields["echo_time"] == pytest.approx(0.03)
    assert fields["inversion_time"] == pytest.approx(0.9)
    fields = h.acquisition_fields({"RepetitionTime": 8.2, "EchoTime": 0.0032, "MagneticFieldStrength": "1.5T"})
    assert fields["repetition_time"] == 8.2 and fields["echo_time"] == 0.0032
    assert fields["field_strength"] == 1.5 and fields["manufacturer"] == "unknown"


def test_duplicated_participant_keeps_first_row_and_is_reported():
    tsv = ("participant_id\tage\tsex\n"
           "sub-01\t24\tM\n"
           "\n"
           "sub-02\t30\tF\n"
           "sub-01\t99\tF\n")
    problems = []
    table = h.participants_table(tsv, None, problems)
    assert table["01"]["age"] == 24.0 and table["01"]["sex"] == "M"
    assert problems == ["participant sub-01 listed again on line 5 (first on line 2): the first row is kept, "
                        "line 5 ignored"]


@pytest.mark.parametrize("text, problem", [
    ("", "participants.tsv is empty"),
    ("  \n\n", "participants.tsv is empty"),
    ("participant_id\tage\n", "header but no participant rows"),
])
def test_empty_participants_file_is_reported(text, problem):
    problems = []
    assert h.participants_table(text, None, problems) == {}
    assert len(problems) == 1 and problem in problems[0]
