"""Seeded, streaming generator of realistic demo CloudEvents for three business units.

``retail`` (sources ``retail/pos`` and ``retail/web``), ``bank`` (``bank/core``) and ``telecom``
(``telecom/crm``) each know their own copy of a set of real people (the ground truth, written to
``truth.csv``). Each unit's copy is perturbed the way real feeds are: missing or oddly formatted
emails and phones, typos, nicknames, missing dates of birth, duplicate accounts. Output depends
only on the :class:`DemoSpec` (same spec, same bytes).

    >>> files = generate(Path("demo"), DemoSpec(people=25_000, invalid_rate=0.005))

Size: source records ≈ people × 1.55; valid events ≈ source records × events_per_record
(≈ 12.4 × people at the default 8.0: 25k people ≈ 310k events, 80k people ≈ 1M events).
"""

from __future__ import annotations

import csv
import heapq
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from datetime import datetime, timezone
from hashlib import blake2b
from pathlib import Path

import orjson

# ----------------------------------------------------------------------------------------------
# reference lists (UK-style names, streets, towns, catalogues); no randomness here
# ----------------------------------------------------------------------------------------------

FEMALE_FIRST = tuple("""
Olivia Amelia Isla Ava Mia Ivy Lily Isabella Rosie Sophia Grace Freya Willow Florence Emily Ella
Poppy Evie Elsie Charlotte Evelyn Sienna Daisy Phoebe Sophie Alice Harper Matilda Ruby Emilia
Maya Millie Isabelle Eva Luna Jessica Esme Arabella Bonnie Margot Hallie Layla Aurora Thea Mila
Eliza Maeve Harriet Mabel Penelope Imogen Violet Lucy Hannah Zara Nancy Chloe Ada Lottie Iris
Elizabeth Katherine Margaret Victoria Rebecca Samantha Jennifer Deborah Susan Patricia Barbara
Christine Karen Sarah Rachel Laura Amy Emma Claire Louise Helen Joanne Nicola Michelle Kelly
Gemma Natalie Jade Stacey Kirsty Lisa Donna Tracey Julie Angela Alison Caroline Fiona Gillian
Jacqueline Lorraine Sharon Wendy Pauline Janet Linda Carol Diane Valerie Maureen Brenda Sandra
Catherine Abigail Megan Bethany Lauren Holly Georgia Leah Amber Naomi Aisha Fatima Priya Anjali
Zainab Amira Maryam Agnieszka Katarzyna Oksana Niamh Siobhan Aoife Caitlin Eilidh Morag Rhiannon
Cerys Ffion Bronwen Dorothy Joan Eileen Sheila Irene Hazel Rita Beryl Gwen Jasmine Tamsin
""".split())

MALE_FIRST = tuple("""
Oliver George Noah Arthur Muhammad Leo Harry Oscar Archie Henry Theodore Freddie Jack Charlie
Theo Alfie Jacob Thomas Finley Arlo William Lucas Roman Tommy Isaac Teddy Alexander Luca Edward
James Joshua Albie Elijah Max Mohammed Reuben Mason Sebastian Rory Jude Louie Benjamin Ethan
Adam Hugo Joseph Reggie Ronnie Louis Frankie Daniel Toby Ezra Albert Finn Michael Samuel David
John Robert Richard Christopher Matthew Andrew Mark Paul Stephen Anthony Kevin Gary Simon Peter
Jonathan Timothy Nicholas Philip Martin Ian Neil Craig Stuart Graham Gordon Colin Keith Derek
Trevor Barry Nigel Malcolm Clive Raymond Kenneth Brian Dennis Roy Terence Geoffrey Leslie Alan
Patrick Sean Declan Ciaran Liam Connor Callum Ryan Jamie Lewis Kieran Dylan Jordan Nathan Aaron
Bradley Scott Dean Lee Wayne Carl Darren Jason Shaun Ashley Rhys Owen Gareth Dafydd Iwan Hamish
Angus Fraser Euan Alasdair Ravi Sanjay Arjun Rohan Imran Omar Hassan Bilal Tariq Piotr Tomasz
Krzysztof Marek Andrei Stefan Kwame Kofi Chidi Tunde Emmanuel Francis Vincent Gregory Howard
""".split())

NICKNAMES = {
    "William": ("Will", "Bill", "Billy"), "Robert": ("Rob", "Bob", "Bobby"), "Richard": ("Rich", "Dick"),
    "Elizabeth": ("Liz", "Beth", "Lizzie"), "Katherine": ("Kate", "Katie", "Kathy"), "Catherine": ("Cathy", "Kate"),
    "Margaret": ("Maggie", "Peggy", "Meg"), "Victoria": ("Vicky", "Tori"), "Rebecca": ("Becky", "Becca"),
    "Samantha": ("Sam", "Sammy"), "Jennifer": ("Jen", "Jenny"), "Deborah": ("Debbie", "Deb"),
    "Susan": ("Sue", "Susie"), "Patricia": ("Pat", "Trish"), "Christine": ("Chris", "Chrissie"),
    "Jacqueline": ("Jackie",), "Alexander": ("Alex", "Sandy"), "Benjamin": ("Ben", "Benny"),
    "Christopher": ("Chris", "Kit"), "Matthew": ("Matt",), "Andrew": ("Andy", "Drew"), "Anthony": ("Tony",),
    "Stephen": ("Steve",), "Nicholas": ("Nick", "Nicky"), "Jonathan": ("Jon", "Johnny"), "Timothy": ("Tim",),
    "Michael": ("Mike", "Mick"), "Daniel": ("Dan", "Danny"), "Joseph": ("Joe", "Joey"), "James": ("Jim", "Jamie"),
    "Thomas": ("Tom", "Tommy"), "Edward": ("Ed", "Eddie", "Ted"), "Samuel": ("Sam",), "David": ("Dave",),
    "Philip": ("Phil",), "Kenneth": ("Ken", "Kenny"), "Terence": ("Terry",), "Geoffrey": ("Geoff",),
    "Gregory": ("Greg",), "Frederick": ("Fred",), "Abigail": ("Abby",), "Isabella": ("Bella", "Izzy"),
    "Isabelle": ("Izzy",), "Penelope": ("Penny",), "Dorothy": ("Dot", "Dotty"), "Josephine": ("Jo",),
    "Joanne": ("Jo",), "Nicola": ("Nicky",), "Gillian": ("Gill",), "Valerie": ("Val",), "Sandra": ("Sandy",),
    "Raymond": ("Ray",), "Vincent": ("Vince",), "Francis": ("Frank",), "Theodore": ("Theo", "Ted"),
    "Albert": ("Al", "Bert"), "Emily": ("Em",), "Charlotte": ("Lottie", "Charlie"), "Florence": ("Flo",),
}

SURNAMES = tuple("""
Smith Jones Williams Taylor Brown Davies Evans Wilson Thomas Johnson Roberts Robinson Thompson
Wright Walker White Edwards Hughes Green Hall Lewis Harris Clarke Patel Jackson Wood Turner Martin
Cooper Hill Ward Morris Moore Clark Lee King Baker Harrison Morgan Allen James Scott Phillips
Watson Davis Parker Price Bennett Young Griffiths Mitchell Kelly Cook Carter Richardson Bailey
Collins Bell Shaw Murphy Miller Cox Richards Khan Marshall Anderson Simpson Ellis Adams Singh
Begum Wilkinson Foster Chapman Powell Webb Rogers Gray Mason Ali Hunt Hussain Campbell Matthews
Owen Palmer Holmes Mills Barnes Knight Lloyd Butler Russell Barker Fisher Stevens Jenkins Murray
Dixon Harvey Graham Pearson Ahmed Fletcher Walsh Kaur Gibson Howard Andrews Stewart Elliott
Reynolds Saunders Payne Fox Ford Pearce Day Brooks West Lawrence Cole Atkinson Bradley Spencer
Gill Dawson Ball Burton O'Brien Watts Rose Booth Perry Ryan Grant Wells Armstrong Francis Rees
Hayes Hart Hudson Newman Barrett Webster Hunter Gregory Carr Lowe Page Marsh Riley Dunn Woods
Parsons Berry Stone Reid Holland Hawkins Harding Porter Robertson Newton Oliver Reed Kennedy
Williamson Bird Gardner Shah Dean Lane Cooke Bates Henderson Parry Burgess Bishop Walton Burns
Nicholson Shepherd Ross Cross Long Freeman Warren Nicholls Hamilton Byrne Sutton McDonald Yates
Hodgson Robson Curtis Hopkins O'Connor Harper Coleman Watkins Moss McCarthy Chambers O'Neill
Griffin Sharp Hardy Wheeler Potter Osborne Johnston Gordon Doyle Wallace George Jordan Hutchinson
Rahman Akhtar Nowak Kowalski Wisniewski Mensah Okafor Adeyemi Chen Wong Nguyen Kumar Sharma
Mahmood Iqbal Islam Uddin Chowdhury Mistry Joshi Desai Fernandes Pereira Silva Santos Costa
Ferguson MacLeod Fraser Sinclair Buchanan Cameron Mackenzie Duncan Munro Henderson-Smith Lloyd-Jones
Pritchard Vaughan Powell-Evans Llewellyn Bowen Howell Jenkinson Whitehead Lambert Fleming Barlow
Kirby Pollard Wade Slater Bradshaw Hartley Lord Metcalfe Sutcliffe Ashworth Greenwood Holt Kay
""".split())

STREETS = tuple("""
High|Station|Church|Victoria|Green|Manor|Park|Queens|Kings|Grange|Mill|New|School|Springfield|
Windsor|Highfield|Broadway|Alexandra|Albert|York|London|Main|North|South|West|East|Chester|
Stanley|Richmond|Cedar|Elm|Oak|Beech|Willow|Ash|Meadow|Orchard|Mount|Castle|Bridge|Market|
Chapel|Cromwell|Nelson|Wellington|Denmark|Clarence|Marlborough|Salisbury|Devonshire|Belgrave|
Cambridge|Oxford|Grosvenor|Gladstone|Stafford|Warwick|Lancaster|Hampton|Bedford|Cavendish
""".replace("\n", "").split("|"))

STREET_KINDS = ("Street", "Road", "Lane", "Avenue", "Close", "Drive", "Gardens", "Crescent", "Way", "Place",
                "Terrace", "Grove")
STREET_ABBREVIATIONS = {"Street": "St", "Road": "Rd", "Lane": "Ln", "Avenue": "Ave", "Close": "Cl",
                        "Drive": "Dr", "Gardens": "Gdns", "Crescent": "Cres", "Place": "Pl", "Terrace": "Ter",
                        "Grove": "Gr", "Way": "Way"}

# town, weight (rough population share), postcode outward codes
TOWNS = (
    ("London", 30, ("SW1A", "SE1", "E1", "E14", "N1", "N7", "NW1", "NW3", "W2", "W12", "SW11", "SE15", "E17", "N16", "SW19")),
    ("Birmingham", 6, ("B1", "B5", "B13", "B15", "B29")),
    ("Manchester", 6, ("M1", "M4", "M14", "M20", "M21")),
    ("Leeds", 4, ("LS1", "LS6", "LS8", "LS17")),
    ("Glasgow", 4, ("G1", "G3", "G12", "G41")),
    ("Liverpool", 3, ("L1", "L8", "L15", "L18")),
    ("Bristol", 3, ("BS1", "BS6", "BS8", "BS16")),
    ("Sheffield", 3, ("S1", "S7", "S10", "S11")),
    ("Edinburgh", 3, ("EH1", "EH3", "EH10", "EH12")),
    ("Cardiff", 2, ("CF10", "CF11", "CF14", "CF24")),
    ("Newcastle upon Tyne", 2, ("NE1", "NE2", "NE4", "NE6")),
    ("Nottingham", 2, ("NG1", "NG5", "NG7")),
    ("Leicester", 2, ("LE1", "LE2", "LE3")),
    ("Southampton", 2, ("SO14", "SO15", "SO17")),
    ("Brighton", 2, ("BN1", "BN2", "BN3")),
    ("Belfast", 2, ("BT1", "BT7", "BT9")),
    ("Oxford", 1, ("OX1", "OX2", "OX4")),
    ("Cambridge", 1, ("CB1", "CB2", "CB4")),
    ("York", 1, ("YO1", "YO10", "YO24")),
    ("Aberdeen", 1, ("AB10", "AB11", "AB15")),
    ("Reading", 1, ("RG1", "RG2", "RG30")),
    ("Coventry", 1, ("CV1", "CV3", "CV5")),
    ("Norwich", 1, ("NR1", "NR2", "NR3")),
    ("Plymouth", 1, ("PL1", "PL4", "PL6")),
    ("Exeter", 1, ("EX1", "EX2", "EX4")),
    ("Bath", 1, ("BA1", "BA2")),
    ("Swansea", 1, ("SA1", "SA2")),
    ("Milton Keynes", 1, ("MK9", "MK10")),
)

POSTCODE_LETTERS = "ABDEFGHJLNPQRSTUWXYZ"  # letters used in the inward code (no C I K M O V)

EMAIL_PROVIDERS = (("gmail.com", 30), ("outlook.com", 10), ("hotmail.co.uk", 12), ("yahoo.co.uk", 8),
                   ("btinternet.com", 7), ("icloud.com", 8), ("sky.com", 5), ("virginmedia.com", 4),
                   ("live.co.uk", 4), ("aol.com", 2), ("protonmail.com", 2), ("me.com", 2), ("talktalk.net", 3),
                   ("googlemail.com", 3))
WORK_DOMAINS = ("nhs.net", "tesco.com", "bt.com", "barclays.com", "hsbc.co.uk", "ons.gov.uk", "ed.ac.uk",
                "manchester.ac.uk", "bbc.co.uk", "arup.com", "deloitte.co.uk", "kpmg.co.uk", "unilever.com")

# catalogues: (sku prefix, category, low price, high price, max quantity)
CATALOGUES = {
    "retail": (("GROC", "grocery", 0.8, 12.0, 4), ("CLTH", "clothing", 6.0, 90.0, 2),
               ("HOME", "home", 3.0, 150.0, 2), ("ELEC", "electronics", 15.0, 600.0, 1),
               ("BEAU", "beauty", 2.5, 45.0, 3), ("TOYS", "toys", 4.0, 70.0, 2), ("GARD", "garden", 3.0, 220.0, 2)),
    "bank": (("INS", "insurance", 90.0, 900.0, 1), ("CARD", "card fee", 12.0, 180.0, 1),
             ("FX", "travel money", 50.0, 1500.0, 1), ("SAFE", "safe deposit", 40.0, 120.0, 1)),
    "telecom": (("PLAN", "plan", 8.0, 65.0, 1), ("HSET", "handset", 120.0, 1300.0, 1),
                ("ACC", "accessory", 6.0, 80.0, 3), ("TOPUP", "top-up", 5.0, 40.0, 2), ("BB", "broadband", 22.0, 60.0, 1)),
}

CAMPAIGN_THEMES = {
    "retail": ("spring-sale", "summer-sale", "back-to-school", "black-friday", "christmas", "new-arrivals",
               "loyalty-points", "weekly-offers"),
    "bank": ("savings-rate", "mortgage-review", "credit-card", "app-launch", "fraud-awareness", "isa-season"),
    "telecom": ("upgrade-offer", "5g-launch", "roaming", "broadband-bundle", "contract-renewal", "family-plan"),
}

FEEDBACK_COMMENTS = {
    "bad": ("Waited far too long", "Nobody called me back", "Charged twice, still not refunded",
            "Very disappointed with the service", "Staff were rude", "The app keeps crashing",
            "Thinking of switching provider", "Item arrived damaged"),
    "neutral": ("It was fine", "OK but could be quicker", "Average experience", "Nothing special",
                "Took a while but sorted in the end"),
    "good": ("Great service, thank you", "Very helpful staff", "Quick and easy", "Excellent as always",
             "Sorted my problem first time", "Love the new app", "Friendly and professional"),
}


# ----------------------------------------------------------------------------------------------
# the generator
# ----------------------------------------------------------------------------------------------

UNITS = ("retail", "bank", "telecom")
EVENT_TYPES = ("cdp.identify", "cdp.purchase", "cdp.call", "cdp.email", "cdp.social", "cdp.feedback",
               "cdp.consent")
INVALID_KINDS = ("broken_json", "unknown_type", "missing_business_unit", "wrong_type")

# relative weights of the event types after the first identify, per unit
_TYPE_WEIGHTS = {
    "retail": {"cdp.identify": 5, "cdp.purchase": 40, "cdp.call": 5, "cdp.email": 20, "cdp.social": 12,
               "cdp.feedback": 9, "cdp.consent": 5},
    "bank": {"cdp.identify": 8, "cdp.purchase": 6, "cdp.call": 25, "cdp.email": 25, "cdp.social": 4,
             "cdp.feedback": 12, "cdp.consent": 10},
    "telecom": {"cdp.identify": 8, "cdp.purchase": 15, "cdp.call": 25, "cdp.email": 20, "cdp.social": 10,
                "cdp.feedback": 14, "cdp.consent": 8},
}
_P_OPEN, _P_CLICK, _P_BOUNCE, _P_UNSUB = 0.42, 0.30, 0.03, 0.04  # email funnel
_EMAIL_EXTRA = _P_OPEN * (1 + _P_CLICK + _P_UNSUB)                 # expected events per "sent" beyond it

# how often a unit's copy of the profile lacks a field (normal mode)
_MISSING = {
    "retail": {"email": 0.22, "phone": 0.25, "dob": 0.45},
    "bank": {"email": 0.20, "phone": 0.10, "dob": 0.02},
    "telecom": {"email": 0.33, "phone": 0.22, "dob": 0.20},
}
_UNIT_SOURCES = {"retail": ("retail/web", "retail/pos"), "bank": ("bank/core",), "telecom": ("telecom/crm",)}
_CSV_COLUMNS = ("CustomerNo", "Email", "Mobile", "FirstName", "Surname", "Street", "Town", "Postcode",
                "DateOfBirth", "Since")
_KEYBOARD = {c: n for c, n in zip(
    "qwertyuiopasdfghjklzxcvbnm",
    ("wa", "qes", "wrd", "etf", "ryg", "tuh", "yij", "uok", "ipl", "ol", "qsz", "awdx", "sefc", "drgv", "fthb",
     "gyjn", "hukm", "jil", "kop", "zsx", "xdc", "cfv", "vgb", "bhn", "njm", "mk"))}


@dataclass
class DemoSpec:
    """What to generate.

    people            real persons (ground truth); each is a customer of 1-3 units (60 % / 30 % / 10 %)
                      and about 3 % of memberships are duplicate accounts, so source records
                      ≈ people × 1.55.
    events_per_record mean number of valid events per source record (the first is always a
                      ``cdp.identify``). Total valid events ≈ people × 1.55 × events_per_record, i.e.
                      ≈ 12.4 × people with the default 8.0 (people=25_000 → ≈ 310k events;
                      people=80_000 → ≈ 1M events).
    invalid_rate      probability, per valid event after a record's first, that one extra bad line is
                      emitted next to it (broken JSON, unknown type, missing business_unit, wrong
                      field type). Bad lines are not part of the truth.
    hard              identity-benchmark mode: more and harder typos, swapped names, no email shared
                      across units, households sharing phone and address, ≈15 % of records with only
                      name + address + date of birth.
    start, end        ISO dates (UTC) bounding event times.
    """

    people: int = 2000
    seed: int = 7
    hard: bool = False
    invalid_rate: float = 0.0
    events_per_record: float = 8.0
    start: str = "2024-11-01"
    end: str = "2026-11-01"


@dataclass
class DemoFiles:
    event_files: list[Path]   # retail.jsonl, bank.jsonl, telecom.jsonl (+ the legacy CSV when asked for)
    truth_file: Path          # truth.csv: business_unit,source_id,person_id
    events: int               # valid events written to the JSONL files
    invalid: int              # bad lines written to the JSONL files (not in the truth)
    source_records: int       # rows of truth.csv
    people: int


class _Bloom:
    """Fixed-size set of strings with no false negatives, deterministic across processes."""

    def __init__(self, expected: int):
        bits = 1 << max(16, (max(expected, 1) * 24).bit_length())
        self._mask = bits - 1
        self._bits = bytearray(bits >> 3)

    def add_if_new(self, text: str) -> bool:
        h = int.from_bytes(blake2b(text.encode(), digest_size=16).digest(), "little")
        a, b = h & self._mask, (h >> 64) & self._mask
        bits = self._bits
        if bits[a >> 3] & (1 << (a & 7)) and bits[b >> 3] & (1 << (b & 7)):
            return False
        bits[a >> 3] |= 1 << (a & 7)
        bits[b >> 3] |= 1 << (b & 7)
        return True


def _epoch(day: str) -> int:
    return int(datetime.fromisoformat(day).replace(tzinfo=timezone.utc).timestamp())


def _rfc3339(t: int, _fmt: str = "%Y-%m-%dT%H:%M:%SZ") -> str:
    return time.strftime(_fmt, time.gmtime(t))


def _table(weights: dict, size: int = 1000) -> list:
    """Lookup table for fast weighted choice: table[int(random() * size)]."""
    total = sum(weights.values())
    out: list = []
    acc = 0.0
    for key, w in weights.items():
        acc += w
        out.extend([key] * (round(acc / total * size) - len(out)))
    return out


class _Generator:
    """Produces, person by person, the source records and their events. One random stream, so the
    output depends only on the spec."""

    def __init__(self, spec: DemoSpec):
        if spec.people < 0 or spec.events_per_record < 1:
            raise ValueError("people must be >= 0 and events_per_record >= 1")
        self.spec = spec
        self.hard = spec.hard
        self.rng = rng = random.Random(spec.seed)
        self.t0 = _epoch(spec.start)
        self.t1 = _epoch(spec.end)
        if self.t1 - self.t0 < 86400 * 30:
            raise ValueError("the time range must span at least 30 days")
        self.emails = _Bloom(spec.people * 3)
        self.counters = {"retail": 1000 + rng.randrange(5000), "bank": 10000 + rng.randrange(9000),
                         "telecom": 90_000_000 + rng.randrange(9_000_000)}
        self.order_counter = 100000 + rng.randrange(100000)
        self.type_tables = {u: _table(w) for u, w in _TYPE_WEIGHTS.items()}
        self.slot_mean = {}
        for unit, w in _TYPE_WEIGHTS.items():
            per_slot = 1 + w["cdp.email"] / sum(w.values()) * _EMAIL_EXTRA
            self.slot_mean[unit] = (spec.events_per_record - 1) / per_slot
        self.towns = _table({i: t[1] for i, t in enumerate(TOWNS)})
        self.providers = _table(dict(EMAIL_PROVIDERS))
        self.hours = _table({0: 1, 1: 0.5, 2: 0.3, 3: 0.2, 4: 0.2, 5: 0.4, 6: 1, 7: 3, 8: 5, 9: 7, 10: 8, 11: 8,
                             12: 9, 13: 8, 14: 7, 15: 7, 16: 7, 17: 7, 18: 8, 19: 8, 20: 7, 21: 5, 22: 3, 23: 2})
        self.catalogue = {}
        for unit, cats in CATALOGUES.items():
            items = []
            for prefix, _name, low, high, max_q in cats:
                for n in range(40):
                    cents = int(math.exp(rng.uniform(math.log(low), math.log(high))) * 100)
                    cents = cents - cents % 100 + (99 if rng.random() < 0.6 else rng.choice((0, 49, 50, 95)))
                    items.append((f"{unit[:2].upper()}-{prefix}-{1000 + n * 7 + rng.randrange(7)}",
                                  max(cents, 50), max_q))
            self.catalogue[unit] = items
        # affine bijections so that phone numbers, NI numbers and loyalty ids are unique per person
        self.phone_perm = (self._coprime(10**8), rng.randrange(10**8))
        self.ni_perm = (self._coprime(10**6), rng.randrange(10**6))
        self.loyalty_perm = (self._coprime(10**10), rng.randrange(10**10))
        self.household: dict | None = None
        self.stats = {"records": 0}

    def _coprime(self, modulus: int) -> int:
        """A multiplier coprime with a power of ten, so that index -> (a*index + b) % modulus is a bijection."""
        while True:
            a = self.rng.randrange(modulus // 10, modulus)
            if a % 2 and a % 5:
                return a

    # ---- people --------------------------------------------------------------------------------

    def _address(self) -> dict:
        rng = self.rng
        town, _w, outs = TOWNS[self.towns[int(rng.random() * len(self.towns))]]
        postcode = (f"{rng.choice(outs)} {rng.randrange(1, 10)}"
                    f"{rng.choice(POSTCODE_LETTERS)}{rng.choice(POSTCODE_LETTERS)}")
        kind = rng.choice(STREET_KINDS)
        addr = {"number": rng.randrange(1, 180) if rng.random() < 0.9 else rng.randrange(180, 400),
                "street": f"{rng.choice(STREETS)} {kind}", "kind": kind, "city": town, "postcode": postcode,
                "flat": rng.randrange(1, 30) if rng.random() < 0.18 else None}
        return addr

    def _email(self, first: str, last: str, year: int, work: bool = False) -> str:
        rng = self.rng
        f = "".join(c for c in first.lower() if c.isalpha())
        l = "".join(c for c in last.lower() if c.isalpha())
        domain = rng.choice(WORK_DOMAINS) if work else self.providers[int(rng.random() * len(self.providers))]
        pattern = rng.random()
        if work or pattern < 0.35:
            local = f"{f}.{l}"
        elif pattern < 0.5:
            local = f"{f}{l}"
        elif pattern < 0.62:
            local = f"{f[0]}.{l}"
        elif pattern < 0.72:
            local = f"{f}_{l}"
        elif pattern < 0.88:
            local = f"{f}{l}{year % 100:02d}"
        else:
            local = f"{f}.{l}{rng.randrange(1, 100)}"
        email = f"{local}@{domain}"
        while not self.emails.add_if_new(email):
            email = f"{local}{rng.randrange(1, 1000)}@{domain}"
        return email

    def _phone(self, index: int) -> str:
        a, b = self.phone_perm
        n = (a * index + b) % 10**8  # 8 digits after "07x": prefixes 071-075, 077-079 are real mobile ranges
        prefix = "7" + "12345789"[index % 8]
        digits = f"{prefix}{n:08d}"            # 10 national digits, e.g. 7700900123
        return digits

    def _person(self, index: int) -> dict:
        rng = self.rng
        hh = self.household
        join = hh is not None and rng.random() < (0.20 if self.hard else 0.08)
        female = rng.random() < 0.51
        first = rng.choice(FEMALE_FIRST if female else MALE_FIRST)
        if join and rng.random() < 0.75:
            last = hh["last"]
        else:
            last = rng.choice(SURNAMES)
            if rng.random() < 0.02:
                last = f"{last}-{rng.choice(SURNAMES)}"
        age_days = int(rng.triangular(18, 88, 38) * 365.25)
        dob_t = self.t0 - age_days * 86400 - rng.randrange(86400 * 300)
        dob = time.strftime("%Y-%m-%d", time.gmtime(dob_t))
        year = int(dob[:4])
        address = hh["address"] if join else self._address()
        phone = hh["phone"] if (join and self.hard) else self._phone(index)
        emails = [self._email(first, last, year)]
        if self.hard:
            emails.append(self._email(first, last, year, work=rng.random() < 0.5))
            emails.append(self._email(first, last, year))
        elif rng.random() < 0.25:
            emails.append(self._email(first, last, year, work=rng.random() < 0.4))
        a, b = self.ni_perm
        ni_digits = (a * index + b) % 10**6
        ni = (f"{'ABCEGHJKLMNOPRSTWXYZ'[(index // 7) % 20]}{'ABCEGHJKLMNPRSTWXYZ'[(index // 140) % 19]}"
              f"{ni_digits:06d}{'ABCD'[index % 4]}")
        loyalty = None
        if rng.random() < 0.45:
            a, b = self.loyalty_perm
            loyalty = f"LC{(a * index + b) % 10**10:010d}"
        person = {"id": f"P{index + 1:07d}", "first": first, "last": last, "dob": dob, "address": address,
                  "phone": phone, "emails": emails, "ni": ni, "loyalty": loyalty}
        if not join:
            self.household = {"last": last, "address": address, "phone": phone}
        return person

    # ---- one unit's copy of a person -----------------------------------------------------------

    def _typo(self, name: str, hard: bool) -> str:
        rng = self.rng
        if len(name) < 3:
            return name
        i = rng.randrange(1, len(name) - 1)
        kind = rng.random()
        if hard and kind < 0.3:
            return name[:i] + name[i + 1] + name[i] + name[i + 2:]          # transposition
        if kind < 0.55:
            c = name[i].lower()
            sub = rng.choice(_KEYBOARD.get(c, "e"))
            return name[:i] + sub + name[i + 1:]                              # neighbouring key
        if kind < 0.8:
            return name[:i] + name[i + 1:]                                    # dropped letter
        return name[:i] + name[i] + name[i:]                                  # doubled letter

    def _phone_text(self, digits: str) -> str:
        r = self.rng.random()
        a, b = digits[:4], digits[4:]
        if r < 0.35:
            return f"0{a} {b}"
        if r < 0.55:
            return f"+44 {a} {b}"
        if r < 0.65:
            return f"0044 {a}-{b}"
        if r < 0.75:
            return f"(0{a}) {b[:3]} {b[3:]}"
        if r < 0.9:
            return f"0{digits}"
        return f"+44{digits}"

    def _address_copy(self, addr: dict, unit: str) -> dict:
        rng = self.rng
        street = addr["street"]
        if rng.random() < 0.3:
            street = street[: -len(addr["kind"])] + STREET_ABBREVIATIONS[addr["kind"]]
        street = f"{addr['number']} {street}"
        out = {"street": street}
        if addr["flat"] is not None:
            if rng.random() < 0.6:
                out["line2"] = f"Flat {addr['flat']}"
            else:
                out["street"] = f"Flat {addr['flat']}, {street}"
        city, postcode = addr["city"], addr["postcode"]
        r = rng.random()
        if r < 0.12:
            postcode = postcode.replace(" ", "")
        elif r < 0.18:
            postcode = postcode.lower()
        if rng.random() < 0.1:
            city = city.upper()
        out["city"] = city
        out["postcode"] = postcode
        if unit == "bank" or rng.random() < 0.2:
            out["country"] = "GB"
        return out

    def _record(self, person: dict, unit: str, slot: int, duplicate: bool) -> dict:
        """The unit's own copy of a person's profile, perturbed."""
        rng = self.rng
        hard = self.hard
        self.counters[unit] += rng.randrange(1, 4) if unit != "telecom" else rng.randrange(1, 10)
        n = self.counters[unit]
        source_id = {"retail": f"R{n:07d}", "bank": f"B-{n:05d}", "telecom": f"T{n:08d}"}[unit]
        first, last = person["first"], person["last"]
        r = rng.random()
        if r < 0.08 and first in NICKNAMES:
            first = rng.choice(NICKNAMES[first])
        typo_rate = 0.25 if hard else 0.10
        if rng.random() < typo_rate:
            if rng.random() < 0.5:
                first = self._typo(first, hard)
            else:
                last = self._typo(last, hard)
            if hard and rng.random() < 0.2:
                first = self._typo(first, hard)
        r = rng.random()
        if r < 0.05:
            first, last = first.upper(), last.upper()
        elif r < 0.08:
            first, last = first.lower(), last.lower()
        if hard and rng.random() < 0.04:
            first, last = last, first
        cust: dict = {"source_id": source_id, "first_name": first, "last_name": last}
        missing = _MISSING[unit]
        bare = hard and rng.random() < 0.15          # only name + address + date of birth
        emails = person["emails"]
        if not bare:
            if hard:
                email = emails[slot] if slot < len(emails) and rng.random() > 0.15 else None
            elif duplicate:
                email = emails[-1] if len(emails) > 1 and rng.random() < 0.6 else None
            else:
                email = (emails[0] if len(emails) == 1 or rng.random() < 0.8 else emails[1])
                if rng.random() < missing["email"]:
                    email = None
            if email is not None:
                if rng.random() < 0.1:
                    email = f"{' ' * rng.randrange(0, 3)}{email.title() if rng.random() < 0.5 else email.upper()} "
                cust["email"] = email
            if rng.random() >= (missing["phone"] + (0.1 if hard else 0.0)):
                cust["phone"] = self._phone_text(person["phone"])
        if bare or rng.random() >= missing["dob"]:
            dob = person["dob"]
            if hard and rng.random() < 0.03 and int(dob[8:]) <= 12:
                dob = f"{dob[:5]}{dob[8:]}-{dob[5:7]}"   # day and month swapped
            cust["date_of_birth"] = dob
        if not bare:
            if unit == "bank" and rng.random() < 0.92:
                ni = person["ni"]
                cust["national_id"] = ni if rng.random() < 0.8 else f"{ni[:2]} {ni[2:4]} {ni[4:6]} {ni[6:8]} {ni[8]}"
            if unit == "retail" and person["loyalty"] is not None and not duplicate:
                cust["loyalty_id"] = person["loyalty"]
        cust["address"] = self._address_copy(person["address"], unit)
        return cust

    # ---- events --------------------------------------------------------------------------------

    def _id(self) -> str:
        h = "%032x" % self.rng.getrandbits(128)
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"

    def _time_of_day(self, day_t: int) -> int:
        rand = self.rng.random
        return day_t - day_t % 86400 + self.hours[int(rand() * 1000)] * 3600 + int(rand() * 3600)

    def _events(self, unit: str, cust: dict, start: int, stop: int) -> list:
        """All events of one source record as (time, event) with event a dict (or bytes for a
        deliberately broken line), in time order."""
        rng = self.rng
        rand = rng.random
        sources = _UNIT_SOURCES[unit]
        source_id = cust["source_id"]
        web = sources[0]
        identify_source = web if unit != "retail" or rand() < 0.6 else sources[1]
        out = []

        def envelope(source: str, etype: str, t: int, data: dict) -> dict:
            return {"specversion": "1.0", "id": self._id(), "source": source, "type": etype,
                    "time": _rfc3339(t), "subject": source_id, "datacontenttype": "application/json",
                    "data": data}

        def full() -> dict:
            c = dict(cust)
            if "address" in c:
                c["address"] = dict(c["address"])
            return c

        out.append((start, envelope(identify_source, "cdp.identify", start,
                                    {"business_unit": unit, "customer": full()})))
        mean = self.slot_mean[unit]
        n_slots = int(rng.gammavariate(0.8, mean / 0.8) + 0.5)
        span = max(stop - start - 3600, 3600)
        times = sorted(start + 3600 + int(rand() * span) for _ in range(n_slots))
        table = self.type_tables[unit]
        mood = rng.gauss(0.0, 1.0) - (0.8 if stop < self.t1 else 0.0)   # churners are less happy
        catalogue = self.catalogue[unit]
        has_email = "email" in cust
        for t in times:
            t = self._time_of_day(t)
            if t <= start:
                t = start + 60 + rng.randrange(3600)
            etype = table[int(rand() * 1000)]
            r = rand()
            if etype == "cdp.identify":
                customer = full()
            elif r < 0.55:
                customer = {"source_id": source_id}
            elif r < 0.85:
                customer = {"source_id": source_id}
                if has_email and etype in ("cdp.email", "cdp.social", "cdp.consent", "cdp.feedback"):
                    customer["email"] = cust["email"]
                elif "phone" in cust and etype == "cdp.call":
                    customer["phone"] = cust["phone"]
                elif "loyalty_id" in cust:
                    customer["loyalty_id"] = cust["loyalty_id"]
            else:
                customer = full()
            data: dict = {"business_unit": unit, "customer": customer}
            source = web
            if etype == "cdp.purchase":
                self.order_counter += rng.randrange(1, 30)
                items = []
                total = 0
                for _ in range(1 + int(rand() ** 2.2 * 4)):
                    sku, cents, max_q = catalogue[int(rand() * len(catalogue))]
                    q = 1 + int(rand() ** 3 * max_q)
                    total += q * cents
                    items.append({"sku": sku, "quantity": q, "unit_price": cents / 100})
                if unit == "retail":
                    channel = "pos" if rand() < 0.62 else "web"
                    source = sources[1] if channel == "pos" else web
                    if channel == "pos" and "loyalty_id" in cust:
                        customer["loyalty_id"] = cust["loyalty_id"]
                elif unit == "bank":
                    channel = "branch" if rand() < 0.3 else "online"
                else:
                    channel = ("store", "online", "phone")[int(rand() * 3)]
                data.update(order_id=f"{unit[0].upper()}O-{self.order_counter}", amount=total / 100,
                            currency="EUR", items=items, channel=channel)
            elif etype == "cdp.call":
                inbound = rand() < 0.7
                if inbound:
                    outcome = ("resolved", "resolved", "resolved", "escalated", "callback", "complaint")[
                        min(5, max(0, int(rand() * 6 - mood)))]
                    duration = int(math.exp(rng.gauss(5.3, 0.8)))
                else:
                    outcome = ("no_answer", "voicemail", "sale", "resolved", "callback")[int(rand() * 5)]
                    duration = rng.randrange(0, 25) if outcome == "no_answer" else int(math.exp(rng.gauss(4.8, 0.7)))
                data.update(direction="inbound" if inbound else "outbound", duration_seconds=duration,
                            outcome=outcome)
            elif etype == "cdp.email":
                month = time.strftime("%Y-%m", time.gmtime(t))
                themes = CAMPAIGN_THEMES[unit]
                campaign = f"{unit}-{month}-{themes[(int(month[5:]) * 7 + int(month[:4])) % len(themes)]}"
                data.update(campaign=campaign, action="sent")
                out.append((t, envelope(web, etype, t, data)))
                if rand() < _P_BOUNCE:
                    t += rng.randrange(5, 600)
                    out.append((t, envelope(web, etype, t, {"business_unit": unit, "customer": {"source_id": source_id},
                                                              "campaign": campaign, "action": "bounced"})))
                elif rand() < _P_OPEN:
                    t += int(rng.expovariate(1 / 14400)) + 30
                    out.append((t, envelope(web, etype, t, {"business_unit": unit, "customer": {"source_id": source_id},
                                                              "campaign": campaign, "action": "opened"})))
                    if rand() < _P_CLICK:
                        t += rng.randrange(5, 900)
                        out.append((t, envelope(web, etype, t, {"business_unit": unit,
                                                                  "customer": {"source_id": source_id},
                                                                  "campaign": campaign, "action": "clicked"})))
                    if rand() < _P_UNSUB:
                        t += rng.randrange(5, 900)
                        out.append((t, envelope(web, etype, t, {"business_unit": unit,
                                                                  "customer": {"source_id": source_id},
                                                                  "campaign": campaign, "action": "unsubscribed"})))
                continue
            elif etype == "cdp.social":
                data.update(platform=("facebook", "instagram", "x", "tiktok", "linkedin", "youtube")[
                    min(5, int(rand() ** 1.4 * 6))],
                            action=("like", "comment", "share", "follow", "mention", "message", "review")[
                                int(rand() * 7)])
            elif etype == "cdp.feedback":
                happy = mood + rng.gauss(0.6, 1.0)
                if rand() < 0.55:
                    score = min(10, max(0, int(round(7 + happy * 1.6))))
                    kind, band = "nps", ("bad" if score <= 6 else "neutral" if score <= 8 else "good")
                else:
                    score = min(5, max(1, int(round(3.8 + happy * 0.9))))
                    kind, band = "csat", ("bad" if score <= 2 else "neutral" if score == 3 else "good")
                if unit == "retail" and rand() < 0.3:
                    source = sources[1]
                data.update(score=score, kind=kind,
                            comment=rng.choice(FEEDBACK_COMMENTS[band]) if rand() < 0.6 else "")
            elif etype == "cdp.consent":
                data.update(purpose=("email_marketing", "sms_marketing", "phone_marketing", "profiling",
                                     "third_party_sharing")[min(4, int(rand() ** 1.5 * 5))],
                            granted=rand() < 0.7)
            elif unit == "retail":
                source = identify_source
            out.append((t, envelope(source, etype, t, data)))
        out.sort(key=lambda p: p[0])   # stable: the identify stays first
        return out

    def _invalid(self, t: int, event: dict) -> tuple[int, object, str]:
        """A bad copy of a good event, with its own id."""
        rng = self.rng
        kind = INVALID_KINDS[int(rng.random() * 4)]
        bad = dict(event)
        bad["id"] = self._id()
        bad["data"] = data = dict(event["data"])
        data["customer"] = dict(data["customer"])
        t += rng.randrange(1, 120)
        bad["time"] = _rfc3339(t)
        if kind == "unknown_type":
            bad["type"] = rng.choice(("cdp.pageview", "cdp.purchse", "com.example.click", "cdp.return"))
        elif kind == "missing_business_unit":
            del data["business_unit"]
        elif kind == "wrong_type":
            etype = event["type"]
            if etype == "cdp.purchase":
                data["amount"] = rng.choice(("twelve", "12,50 EUR", "n/a"))
            elif etype == "cdp.call":
                data["duration_seconds"] = "five minutes"
            elif etype == "cdp.feedback":
                data["score"] = "ten"
            elif etype == "cdp.consent":
                data["granted"] = "yes please"
            else:   # make it a purchase with a textual amount
                bad["type"] = "cdp.purchase"
                bad["data"] = {"business_unit": data["business_unit"], "customer": data["customer"],
                               "order_id": f"XO-{rng.randrange(10**6)}", "amount": "twelve", "currency": "EUR",
                               "items": [], "channel": "web"}
        else:  # broken_json: a line cut short (after the id, so the line still names itself)
            line = orjson.dumps(bad)
            cut = rng.randrange(max(line.index(b'"source"'), len(line) // 3), len(line) - 1)
            return t, line[:cut], kind
        return t, bad, kind

    def records(self) -> Iterator[tuple[str, str, str, dict, list]]:
        """(business_unit, source_id, person_id, profile, [(time, event, invalid_kind | None)])."""
        rng = self.rng
        spec = self.spec
        t0, t1 = self.t0, self.t1
        invalid_rate = spec.invalid_rate
        pairs = (("retail", "telecom"),) * 40 + (("retail", "bank"),) * 35 + (("bank", "telecom"),) * 25
        singles = ("retail",) * 50 + ("telecom",) * 30 + ("bank",) * 20
        for index in range(spec.people):
            person = self._person(index)
            r = rng.random()
            if r < 0.6:
                units = (singles[int(rng.random() * 100)],)
            elif r < 0.9:
                units = pairs[int(rng.random() * 100)]
            else:
                units = UNITS
            for slot, unit in enumerate(units):
                copies = 2 if rng.random() < 0.03 else 1
                for copy in range(copies):
                    cust = self._record(person, unit, slot, copy > 0)
                    if rng.random() < 0.35:
                        start = t0 + rng.randrange(86400 * 30)           # already a customer when the feed began
                    else:
                        start = t0 + rng.randrange(t1 - t0 - 86400 * 30)
                    start = self._time_of_day(start)
                    stop = t1 - 1
                    if rng.random() < 0.25:
                        stop = start + 86400 + rng.randrange(max(1, t1 - start - 86400))   # churned
                    events = self._events(unit, cust, start, stop)
                    if invalid_rate > 0:
                        mixed = [(events[0][0], events[0][1], None)]
                        for t, ev in events[1:]:
                            mixed.append((t, ev, None))
                            if rng.random() < invalid_rate:
                                mixed.append(self._invalid(t, ev))
                        mixed.sort(key=lambda p: p[0])
                    else:
                        mixed = [(t, ev, None) for t, ev in events]
                    yield unit, cust["source_id"], person["id"], cust, mixed


# ----------------------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------------------

_RUN_EVENTS = 150_000     # events held in memory before a sorted run is written out
_MAX_OPEN_RUNS = 200


def _merge(runs: list[Path], out, tmp: Path) -> None:
    """k-way merge of sorted run files (lines prefixed with a 20-byte time key) into ``out``."""
    level = 0
    while len(runs) > _MAX_OPEN_RUNS:
        merged = []
        for i in range(0, len(runs), _MAX_OPEN_RUNS):
            group = runs[i:i + _MAX_OPEN_RUNS]
            target = tmp / f"merge-{level}-{i}.run"
            files = [open(p, "rb") for p in group]
            try:
                with open(target, "wb") as fh:
                    fh.writelines(heapq.merge(*files))
            finally:
                for f in files:
                    f.close()
            for p in group:
                p.unlink()
            merged.append(target)
        runs = merged
        level += 1
    files = [open(p, "rb") for p in runs]
    try:
        write = out.write
        for line in heapq.merge(*files):
            write(line[20:])
    finally:
        for f in files:
            f.close()


def generate(directory: Path, spec: DemoSpec, progress: Callable[[int], None] | None = None,
             csv_unit: str | None = None) -> DemoFiles:
    """Write ``retail.jsonl``, ``bank.jsonl``, ``telecom.jsonl`` (one CloudEvent per line, each file in
    time order) and ``truth.csv`` (business_unit,source_id,person_id) into ``directory``.

    Memory stays flat: events are generated person by person, sorted in bounded runs written to a
    temporary folder inside ``directory``, and merged. With ``csv_unit`` (e.g. ``"telecom"``) that
    unit's customers are also written as a legacy spreadsheet ``<unit>_customers.csv`` (';'
    delimited, one row per source record, from its first ``cdp.identify``) with
    ``<unit>_customers.mapping.toml``; the CSV is appended to ``event_files`` (its rows are not
    counted in ``events``). ``progress(n)`` is called with the number of valid events produced so far.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if csv_unit is not None and csv_unit not in UNITS:
        raise ValueError(f"csv_unit must be one of {UNITS}")
    gen = _Generator(spec)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-runs-", dir=directory))
    buffers: dict[str, list[bytes]] = {u: [] for u in UNITS}
    runs: dict[str, list[Path]] = {u: [] for u in UNITS}
    dumps = orjson.dumps
    events = invalid = records = buffered = 0
    next_progress = 20_000
    csv_file = csv_writer = None
    try:
        truth_path = directory / "truth.csv"
        with open(truth_path, "w", newline="", encoding="utf-8") as truth_fh:
            truth = csv.writer(truth_fh, lineterminator="\n")
            truth.writerow(("business_unit", "source_id", "person_id"))
            if csv_unit is not None:
                csv_file = open(directory / f"{csv_unit}_customers.csv", "w", newline="", encoding="utf-8")
                csv_writer = csv.writer(csv_file, delimiter=";", lineterminator="\r\n")
                csv_writer.writerow(_CSV_COLUMNS)

            def flush() -> None:
                for unit, buf in buffers.items():
                    if buf:
                        buf.sort()
                        path = tmp / f"{unit}-{len(runs[unit]):05d}.run"
                        with open(path, "wb") as fh:
                            fh.writelines(buf)
                        runs[unit].append(path)
                        buf.clear()

            for unit, source_id, person_id, cust, evs in gen.records():
                truth.writerow((unit, source_id, person_id))
                records += 1
                buf = buffers[unit]
                for t, ev, bad in evs:
                    if bad is None:
                        events += 1
                        line = dumps(ev)
                        key = ev["time"].encode()
                    else:
                        invalid += 1
                        line = ev if bad == "broken_json" else dumps(ev)
                        key = _rfc3339(t).encode()
                    buf.append(key + line + b"\n")
                buffered += len(evs)
                if csv_writer is not None and unit == csv_unit:
                    addr = cust.get("address", {})
                    csv_writer.writerow((source_id, cust.get("email", ""), cust.get("phone", ""),
                                         cust.get("first_name", ""), cust.get("last_name", ""),
                                         addr.get("street", ""), addr.get("city", ""), addr.get("postcode", ""),
                                         cust.get("date_of_birth", ""), evs[0][1]["time"]))
                if buffered >= _RUN_EVENTS:
                    flush()
                    buffered = 0
                if progress is not None and events >= next_progress:
                    progress(events)
                    next_progress = events + 20_000
            flush()
        event_files = []
        for unit in UNITS:
            path = directory / f"{unit}.jsonl"
            with open(path, "wb") as out:
                _merge(runs[unit], out, tmp)
            event_files.append(path)
        if csv_unit is not None:
            csv_file.close()
            csv_path = directory / f"{csv_unit}_customers.csv"
            (directory / f"{csv_unit}_customers.mapping.toml").write_text(_mapping_toml(csv_unit), encoding="utf-8")
            event_files.append(csv_path)
    finally:
        if csv_file is not None and not csv_file.closed:
            csv_file.close()
        shutil.rmtree(tmp, ignore_errors=True)
    if progress is not None:
        progress(events)
    return DemoFiles(event_files=event_files, truth_file=truth_path, events=events, invalid=invalid,
                     source_records=records, people=spec.people)


def _mapping_toml(unit: str) -> str:
    return f'''# Mapping of the legacy {unit} customer spreadsheet onto cdp.identify events.
type = "cdp.identify"
business_unit = "{unit}"
source = "{unit}/legacy-export"
time = "Since"

[columns]
"customer.source_id" = "CustomerNo"
"customer.email" = "Email"
"customer.phone" = "Mobile"
"customer.first_name" = "FirstName"
"customer.last_name" = "Surname"
"customer.address.street" = "Street"
"customer.address.city" = "Town"
"customer.address.postcode" = "Postcode"
"customer.date_of_birth" = "DateOfBirth"

[constants]
"customer.address.country" = "GB"
'''


def iter_events(spec: DemoSpec, *, valid_only: bool = False,
                truth: MutableMapping[tuple[str, str], str] | None = None) -> Iterator[dict]:
    """The events ``generate`` writes for the same spec (equal dicts), without touching disk.

    Order: person by person, each source record's events in time order (its ``cdp.identify``
    first) — not the per-unit time order of the files. Broken-JSON lines cannot be dicts and are
    skipped; the other bad events (unknown type, missing business_unit, wrong field type) are
    yielded unless ``valid_only``. When ``truth`` is given it is filled with
    (business_unit, source_id) -> person_id as records are generated.
    """
    for unit, source_id, person_id, _cust, evs in _Generator(spec).records():
        if truth is not None:
            truth[(unit, source_id)] = person_id
        for _t, ev, bad in evs:
            if bad is None or (not valid_only and bad != "broken_json"):
                yield ev
