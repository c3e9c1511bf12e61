import pytest

from ingest import normalise


def test_email_is_trimmed_and_lower_cased_and_only_usable_ones_link():
    assert normalise.email("  Ann.Lee@Example.ORG ") == "ann.lee@example.org"
    assert normalise.email("not-an-email") is None
    assert normalise.email("two@@example.org") is None


@pytest.mark.parametrize("raw", ["07700 900123", "+44 7700 900123", "0044 7700-900123", "(07700) 900 123"])
def test_uk_phone_formats_become_one_e164_number(raw):
    assert normalise.phone(raw, "GB") == "+447700900123"


def test_phone_region_decides_national_numbers():
    assert normalise.phone("030 1234567", "DE") == "+49301234567"
    assert normalise.phone("12", "GB") is None


def test_names_keep_their_spelling_for_display_and_fold_for_matching():
    profile, _ = normalise.customer({"source_id": "1", "first_name": "  José   María ", "last_name": "O'Neill"}, "GB")
    assert profile["first_name"] == "José María"
    assert normalise.fold("  José   María ") == "jose maria"
    assert normalise.fold("O'Neill") == normalise.fold("o neill")


def test_identifiers_are_normalised_and_unusable_ones_dropped():
    profile, ids = normalise.customer(
        {"source_id": "1", "email": "BAD", "phone": "07911 123456", "national_id": "ab 12 34 56 c",
         "address": {"street": " 1  High St ", "postcode": "sw1a 1aa", "city": "London"}}, "GB")
    assert ids == {"phone": "+447911123456", "national_id": "AB123456C"}
    assert profile["email"] == "BAD"  # kept for display, never used to link
    assert profile["postcode"] == "SW1A1AA" and profile["street"] == "1 High St"


def test_impossible_dates_are_refused_with_the_field_named():
    with pytest.raises(normalise.InvalidValue, match="date_of_birth.*2023-02-30"):
        normalise.birth_date("2023-02-30")
    with pytest.raises(normalise.InvalidValue, match="time"):
        normalise.event_time("2025-13-01T00:00:00Z")


def test_event_times_come_out_in_utc():
    assert normalise.event_time("2025-03-04T12:11:12+02:00") == "2025-03-04T10:11:12+00:00"
    assert normalise.event_time("2025-03-04T10:11:12Z") == "2025-03-04T10:11:12+00:00"
    assert normalise.event_time("2025-03-04T10:11:12.5Z") == "2025-03-04T10:11:12.500000+00:00"


@pytest.mark.parametrize("raw", ["0800 FLOWERS", "0800 123 4567", "07700 900123", "+1 555 0100"])
def test_phones_that_are_not_one_persons_valid_number_never_link(raw):
    """Vanity letters, freephone, Ofcom's drama range, US 555: shown, but never an identifier."""
    profile, ids = normalise.customer({"source_id": "1", "phone": raw}, "GB")
    assert "phone" not in ids
    assert profile["phone"]  # the display value is kept
