import pandas as pd

from openmind_bench.curation.split import split_images, validation_subjects


def _images(n_subjects, sessions=2):
    rows = [{"dataset": f"ds00000{s % 2}", "subject": f"{s:02d}", "session": f"{k}", "image_id": f"i{s}_{k}"}
            for s in range(n_subjects) for k in range(sessions)]
    return pd.DataFrame(rows)


def test_nnssl_bounds():
    images = _images(300)
    assert len(validation_subjects(images, 0.01, 5, 1000, 0)) == 5  # 1% of 300 = 3 -> min 5
    images = _images(2000, sessions=1)
    assert len(validation_subjects(images, 0.01, 5, 1000, 0)) == 20
    assert len(validation_subjects(images, 0.9, 5, 1000, 0)) == 1000


def test_subjects_not_images_are_held_out_and_seeded():
    images = _images(40)
    train, val = split_images(images, {"min_subjects": 4, "seed": 3})
    assert len(val) == 8 and len(train) == 72
    assert not set(zip(train.dataset, train.subject)) & set(zip(val.dataset, val.subject))
    again_train, again_val = split_images(images.sample(frac=1, random_state=1), {"min_subjects": 4, "seed": 3})
    assert set(again_val.image_id) == set(val.image_id)
    _, other = split_images(images, {"min_subjects": 4, "seed": 4})
    assert set(other.image_id) != set(val.image_id)


def test_small_selections_keep_a_training_subject():
    train, val = split_images(_images(3), {"min_subjects": 5})
    assert train.subject.nunique() == 1 and val.subject.nunique() == 2
    train, val = split_images(_images(1), None)
    assert train.equals(val)
