"""`distinct_photos` on bench/photos.py's set (photographs shipped with scikit-image and
matplotlib, and rendered appliances, each with five altered copies): the service's hash
and distance catch at least the copies the docs state and wrongly flag at most the
distinct photos they state. No servers: the same function an upload goes through."""

from __future__ import annotations

from bench import photos
from issuer.integrity import BANDS, PHOTO_DISTANCE


def test_photo_set_is_caught_at_the_stated_rate() -> None:
    # near copies are looked up by bands of the hash: within the distance, one band is equal
    assert PHOTO_DISTANCE < BANDS
    hashed = photos.hashed_set(workers=2)
    assert len(hashed.originals) == 180 and all(len(h) == 6 for h in hashed.originals)
    found = photos.counts(hashed, PHOTO_DISTANCE)
    caught = sum(found.caught.values())
    assert caught >= photos.STATED_CAUGHT, found
    assert found.flagged_photos <= photos.STATED_FLAGGED, photos.close_pairs(hashed, PHOTO_DISTANCE)
    # every plain re-encoding and resize is caught: the losses are crops and recolouring
    assert found.caught["jpeg60"] == found.caught["resized50"] == 180, found
