"""Seeded generator of small, verifiable instruction tasks in Alpaca format (the demo's training data).

Every row has `instruction`, `input` (possibly empty), `output`, `family` and `verifiable`. Verifiable
families have exactly one short right answer, written as the bare answer ("42", not "The answer is 42."),
so exact match after `normalize_answer` is a fair score: a chatty base model mostly fails it, and a model
fine-tuned on these rows learns both the skill and the answer-only format. A fixed, hand-written
`open_ended` set (verifiable: false) keeps some free-text rows in the mix; exact match does not apply there.

Everything here is written by this module (no external dataset), so the data carries the project's license.
Only the standard library is used (and nothing else from ftkit), so the data can be rebuilt without the training
stack installed.

A small multi-turn section (`--conversations`, data/demo_conversations.jsonl) holds OpenAI `messages` rows
whose last answer depends on an earlier turn (a word to remember, a running total, the user's name or city).

`data/generate_demo_data.py` is the command line over it (it rebuilds the shipped files).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Callable

DEFAULT_SEED = 0
DEFAULT_PER_FAMILY = 300
# The shipped files, in the repository's data/ folder.
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEFAULT_OUT = DATA_DIR / "demo_tasks.jsonl"
DEFAULT_CONVERSATIONS_OUT = DATA_DIR / "demo_conversations.jsonl"
DEFAULT_CONVERSATIONS_PER_FAMILY = 200

Task = tuple[str, str, str]  # (instruction, input, output)


def normalize_answer(s: str) -> str:
    """The form both prediction and reference take before exact-match comparison."""
    s = " ".join(s.split())
    if s.endswith("."):
        s = s[:-1].rstrip()
    return s.casefold()


def _days(n: int) -> str:
    return f"{n} day" if n == 1 else f"{n} days"


# -- word lists (written for this script) -----------------------------------------------------------
# Plain lowercase words that tokenize simply; a 135M model must be able to copy and spell them.
WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "green",
    "house",
    "bread",
    "chair",
    "music",
    "ocean",
    "plant",
    "light",
    "water",
    "horse",
    "lemon",
    "table",
    "candle",
    "garden",
    "pencil",
    "window",
    "button",
    "rabbit",
    "orange",
    "silver",
    "forest",
    "basket",
    "dragon",
    "planet",
    "mirror",
    "cat",
    "dog",
    "sun",
    "map",
    "cup",
    "hat",
    "box",
    "pen",
    "bus",
    "egg",
    "fox",
    "key",
    "owl",
    "jam",
    "kite",
    "lamp",
    "moon",
    "nest",
    "rose",
    "ship",
    "tree",
    "wolf",
    "bell",
    "coin",
    "desk",
    "door",
    "fish",
    "frog",
    "gold",
    "leaf",
    "milk",
    "rain",
    "salt",
    "sand",
    "seed",
    "snow",
    "star",
    "wind",
    "book",
    "boat",
    "bird",
    "cake",
    "corn",
    "duck",
    "farm",
    "fire",
    "hill",
    "iron",
    "king",
    "lake",
    "nose",
    "park",
    "ring",
    "road",
    "rock",
    "sock",
    "grape",
    "sheep",
    "truck",
    "piano",
    "queen",
    "zebra",
    "violin",
    "jacket",
    "yellow",
    "winter",
    "summer",
    "bridge",
    "castle",
    "island",
]
FIRST_NAMES = [
    "Maria",
    "James",
    "Aisha",
    "Kenji",
    "Elena",
    "Omar",
    "Sofia",
    "Lucas",
    "Priya",
    "Daniel",
    "Fatima",
    "Noah",
    "Ingrid",
    "Mateo",
    "Chloe",
    "Samuel",
    "Yara",
    "Victor",
    "Hannah",
    "Tomas",
    "Leila",
    "Oscar",
    "Grace",
    "Ivan",
    "Nadia",
    "Felix",
    "Amara",
    "Hugo",
    "Clara",
    "Rafael",
]
LAST_NAMES = [
    "Lopez",
    "Smith",
    "Khan",
    "Tanaka",
    "Petrova",
    "Haddad",
    "Rossi",
    "Silva",
    "Patel",
    "Meyer",
    "Okafor",
    "Brown",
    "Larsen",
    "Garcia",
    "Dubois",
    "Cohen",
    "Nguyen",
    "Novak",
    "Weber",
    "Costa",
    "Moreau",
    "Fischer",
    "Kowalski",
    "Ali",
    "Jensen",
    "Murphy",
    "Santos",
    "Ito",
    "Kim",
    "Horvat",
]
CITIES = [
    "Lisbon",
    "Toronto",
    "Nairobi",
    "Osaka",
    "Denver",
    "Oslo",
    "Cairo",
    "Lima",
    "Madrid",
    "Dublin",
    "Prague",
    "Vienna",
    "Seoul",
    "Sydney",
    "Chicago",
    "Boston",
    "Berlin",
    "Athens",
    "Helsinki",
    "Warsaw",
    "Mumbai",
    "Jakarta",
    "Montreal",
    "Auckland",
    "Budapest",
    "Havana",
    "Manila",
    "Edinburgh",
    "Buenos Aires",
    "Cape Town",
    "New Delhi",
    "Mexico City",
]
# RFC 2606 example domains: the generated addresses can never belong to anyone.
EMAIL_DOMAINS = ["example.com", "example.org", "example.net", "mail.example.com", "team.example.org"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NUMBER_WORDS = {2: "two", 3: "three"}


# -- verifiable families -----------------------------------------------------------------------------
# Each takes the family's own Random and returns one (instruction, input, output); generate() retries
# on duplicates, so a family only needs to make a random draw, not a distinct one.


def arithmetic(rng: random.Random) -> Task:
    # A two-digit number and a one-digit one: a trial fine-tune (150 steps) got only 10-50% right with two
    # two-digit operands, which drowned the format lesson in arithmetic noise.
    a, b = rng.randint(10, 59), rng.randint(1, 9)
    if rng.random() < 0.5:
        t = rng.choice(["What is {a} + {b}?", "Calculate {a} plus {b}.", "Add {b} to {a}."])
        return t.format(a=a, b=b), "", str(a + b)
    t = rng.choice(["What is {a} - {b}?", "Calculate {a} minus {b}.", "Subtract {b} from {a}."])
    return t.format(a=a, b=b), "", str(a - b)


# (from singular, from plural, to plural, factor, largest value). Powers of ten only, so the rule is
# "append zeros": times-60 conversions (hours to minutes) were mostly wrong after a trial fine-tune.
UNITS = [
    ("kilometer", "kilometers", "meters", 1000, 99),
    ("meter", "meters", "centimeters", 100, 99),
    ("centimeter", "centimeters", "millimeters", 10, 99),
    ("kilogram", "kilograms", "grams", 1000, 99),
    ("liter", "liters", "milliliters", 1000, 99),
    ("dollar", "dollars", "cents", 100, 99),
    ("decade", "decades", "years", 10, 20),
    ("century", "centuries", "years", 100, 20),
]


def unit_conversion(rng: random.Random) -> Task:
    one, many, to, factor, top = rng.choice(UNITS)
    v = rng.randint(1, top)
    qty = f"{v} {one if v == 1 else many}"
    t = rng.choice(
        ["Convert {qty} to {to}.", "How many {to} are in {qty}?", "Express {qty} in {to}. Give only the number."]
    )
    return t.format(qty=qty, to=to), "", str(v * factor)


def sort_numbers(rng: random.Random) -> Task:
    # Two-digit numbers with different tens digits, ascending only: mixed one- and two-digit numbers and
    # a descending variant left a trial fine-tune near 15%; this keeps the skill (ordering) but makes
    # each comparison one digit.
    tens = rng.sample(range(1, 10), rng.choice([3, 4]))
    nums = [10 * t + rng.randint(0, 9) for t in tens]
    t = rng.choice(
        [
            "Sort these numbers from smallest to largest.",
            "Arrange the following numbers in ascending order.",
            "List these numbers in increasing order, separated by commas.",
        ]
    )
    return t, ", ".join(map(str, nums)), ", ".join(map(str, sorted(nums)))


def word_ops(rng: random.Random) -> Task:
    # Case changes are left out on purpose: normalize_answer casefolds, so "APPLE" would score equal to
    # an echoed "apple" and the task would test nothing. Reversing word order was dropped after a trial
    # fine-tune: a 135M model garbled it about half the time.
    op = rng.choice(["first_letter", "repeat", "hyphenate"])
    if op == "first_letter":
        w = rng.choice(WORDS)
        t = rng.choice(
            [
                'What is the first letter of the word "{w}"?',
                'Write only the first letter of "{w}".',
                'Which letter does the word "{w}" start with?',
            ]
        )
        return t.format(w=w), "", w[0]
    if op == "repeat":
        w, n = rng.choice(WORDS), rng.choice([2, 3])
        count = NUMBER_WORDS[n] if rng.random() < 0.5 else str(n)
        t = rng.choice(
            [
                'Write the word "{w}" {n} times, separated by spaces.',
                'Repeat "{w}" {n} times with a space between each.',
            ]
        )
        return t.format(w=w, n=count), "", " ".join([w] * n)
    ws = rng.sample(WORDS, rng.choice([2, 3, 4]))
    t = rng.choice(
        [
            "Join these words with hyphens.",
            "Connect the words with hyphens instead of spaces.",
            "Rewrite the words joined by hyphens, with no spaces.",
        ]
    )
    return t, " ".join(ws), "-".join(ws)


MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]


def date_arithmetic(rng: random.Random) -> Task:
    # Offsets stay at 1-3 days: with 1-8 a trial fine-tune got under 20% right.
    kind = rng.choice(["weekday", "month", "add_days"])
    if kind == "weekday":
        n, day = rng.randint(1, 3), rng.choice(WEEKDAYS)
        t = rng.choice(
            [
                "What day of the week is {n} after {day}?",
                "If today is {day}, what day of the week will it be in {n}?",
                "Which weekday comes {n} after {day}?",
            ]
        )
        return t.format(n=_days(n), day=day), "", WEEKDAYS[(WEEKDAYS.index(day) + n) % 7]
    start = dt.date(rng.randint(2020, 2030), rng.randint(1, 12), rng.randint(1, 25))
    if kind == "month":
        t = rng.choice(
            [
                "In which month is the date {d}?",
                "Name the month of the date {d}.",
                "The date {d} is written as YYYY-MM-DD. Which month is it?",
            ]
        )
        return t.format(d=start.isoformat()), "", MONTHS[start.month - 1]
    # Start days up to 25 plus at most 3 days never cross a month end, which keeps the rule learnable
    # (add to the day, copy year and month); the answer is still computed by the calendar.
    n = rng.randint(1, 3)
    t = rng.choice(
        [
            "What is the date {n} after {d}? Answer in YYYY-MM-DD format.",
            "Add {n} to {d}. Give the result as YYYY-MM-DD.",
            "If today is {d}, what will the date be in {n}? Use the YYYY-MM-DD format.",
        ]
    )
    return t.format(n=_days(n), d=start.isoformat()), "", (start + dt.timedelta(days=n)).isoformat()


EMAIL_SENTENCES = [
    "You can reach {name} at {email} for any questions.",
    "Send your application to {email} by Monday.",
    "For support, write to {email} and include your order details.",
    "My new address is {email}, so please update your records.",
    "Contact {email} if the package does not arrive.",
    "{name} asked that all invoices go to {email} from now on.",
]
NAME_SENTENCES = [
    "{name} won the chess tournament on Saturday.",
    "Yesterday, {name} finished painting the fence.",
    "The award for best research went to {name}.",
    "Please send the signed contract to {name} before Friday.",
    "According to the report, {name} will lead the new project.",
    "Our guest speaker this evening is {name}.",
]
NUMBER_SENTENCES = [
    "The package weighs {n} grams.",
    "Our school planted {n} trees last spring.",
    "There were {n} people at the meeting.",
    "The library owns {n} copies of that book.",
    "The bridge is {n} meters long.",
    "She collected {n} stamps from around the world.",
]
CITY_SENTENCES = [
    "The conference will take place in {city} next May.",
    "After college, my sister moved to {city}.",
    "Our flight to {city} leaves at noon.",
    "The museum in {city} opens early on weekends.",
    "They spent a rainy week in {city} last autumn.",
]


def extraction(rng: random.Random) -> Task:
    # Each sentence holds exactly one item of the kind asked for, so there is one right answer.
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    name = f"{first} {last}"
    kind = rng.choice(["email", "name", "number", "city"])
    if kind == "email":
        local = rng.choice([f"{first}.{last}", f"{first[0]}{last}", f"{first}{rng.randint(1, 99)}"]).lower()
        email = f"{local}@{rng.choice(EMAIL_DOMAINS)}"
        t = rng.choice(
            [
                "Extract the email address from the text.",
                "What email address is mentioned in the text?",
                "Find the email address in the sentence. Reply with the address only.",
            ]
        )
        return t, rng.choice(EMAIL_SENTENCES).format(name=name, email=email), email
    if kind == "name":
        t = rng.choice(
            [
                "Extract the person's name from the text.",
                "Who is mentioned in the sentence? Reply with the full name only.",
                "What is the name of the person in the text?",
            ]
        )
        return t, rng.choice(NAME_SENTENCES).format(name=name), name
    if kind == "number":
        n = rng.randint(2, 999)
        t = rng.choice(
            [
                "Extract the number from the text.",
                "What number appears in the sentence?",
                "Find the number in the text. Reply with the digits only.",
            ]
        )
        return t, rng.choice(NUMBER_SENTENCES).format(n=n), str(n)
    city = rng.choice(CITIES)
    t = rng.choice(
        [
            "Extract the city from the text.",
            "Which city is mentioned in the sentence?",
            "Name the city that appears in the text.",
        ]
    )
    return t, rng.choice(CITY_SENTENCES).format(city=city), city


GENERATORS: dict[str, Callable[[random.Random], Task]] = {
    "arithmetic": arithmetic,
    "unit_conversion": unit_conversion,
    "sort_numbers": sort_numbers,
    "word_ops": word_ops,
    "date_arithmetic": date_arithmetic,
    "extraction": extraction,
}
VERIFIABLE_FAMILIES = list(GENERATORS)


# -- open-ended rows (hand-written for this project) ------------------------------------------------
# (instruction, input, output). Short, uncontroversial answers; several phrasings would be right, so
# these rows are marked verifiable: false and kept out of exact-match scoring.
OPEN_ENDED: list[Task] = [
    ("Give a synonym for happy.", "", "Joyful"),
    ("Give a synonym for big.", "", "Large"),
    ("Give a synonym for fast.", "", "Quick"),
    ("Give a synonym for small.", "", "Tiny"),
    ("Give a synonym for begin.", "", "Start"),
    ("Give a synonym for smart.", "", "Intelligent"),
    ("Give a synonym for quiet.", "", "Silent"),
    ("Give a synonym for rich.", "", "Wealthy"),
    ("Give a synonym for brave.", "", "Courageous"),
    ("Give a synonym for easy.", "", "Simple"),
    ("Give a synonym for funny.", "", "Amusing"),
    ("Give a synonym for tired.", "", "Weary"),
    ("Give an antonym for hot.", "", "Cold"),
    ("Give an antonym for early.", "", "Late"),
    ("Give an antonym for full.", "", "Empty"),
    ("Give an antonym for strong.", "", "Weak"),
    ("Give an antonym for buy.", "", "Sell"),
    ("Give an antonym for arrive.", "", "Depart"),
    ("Give an antonym for accept.", "", "Reject"),
    ("Give an antonym for increase.", "", "Decrease"),
    ("Give an antonym for inside.", "", "Outside"),
    ("Give an antonym for ancient.", "", "Modern"),
    ("What is the plural of mouse?", "", "Mice"),
    ("What is the plural of child?", "", "Children"),
    ("What is the past tense of go?", "", "Went"),
    ("What is the past tense of run?", "", "Ran"),
    (
        "Explain what photosynthesis is in one sentence.",
        "",
        "Photosynthesis is the process by which plants use sunlight, water, and carbon dioxide to make sugar "
        "and release oxygen.",
    ),
    (
        "Explain what gravity is in one sentence.",
        "",
        "Gravity is the force by which objects with mass attract one another, which is why things fall "
        "toward the Earth.",
    ),
    (
        "Explain what evaporation is in one sentence.",
        "",
        "Evaporation is the process in which a liquid turns into a gas, such as a puddle drying in the sun.",
    ),
    ("Explain what a noun is in one sentence.", "", "A noun is a word that names a person, place, thing, or idea."),
    ("Explain what a verb is in one sentence.", "", "A verb is a word that describes an action, state, or occurrence."),
    (
        "Describe the water cycle in one sentence.",
        "",
        "Water evaporates, condenses into clouds, falls as precipitation, and collects in rivers, lakes, and "
        "oceans before evaporating again.",
    ),
    (
        "Explain what a prime number is in one sentence.",
        "",
        "A prime number is a whole number greater than 1 whose only divisors are 1 and itself.",
    ),
    (
        "Explain what democracy is in one sentence.",
        "",
        "Democracy is a system of government in which citizens choose their leaders, usually by voting.",
    ),
    (
        "Explain what inflation is in one sentence.",
        "",
        "Inflation is the general rise in prices over time, which reduces how much a unit of money can buy.",
    ),
    ("What does a thermometer measure?", "", "Temperature"),
    (
        "Explain what recycling is in one sentence.",
        "",
        "Recycling is turning used materials into new products instead of throwing them away.",
    ),
    (
        "Explain what an ecosystem is in one sentence.",
        "",
        "An ecosystem is a community of living things interacting with each other and with their physical environment.",
    ),
    (
        "Explain what a vaccine does in one sentence.",
        "",
        "A vaccine trains the immune system to recognize and fight a specific disease.",
    ),
    (
        "Explain what the internet is in one sentence.",
        "",
        "The internet is a global network of connected computers that exchange information.",
    ),
    (
        "Explain what an atom is in one sentence.",
        "",
        "An atom is the smallest unit of a chemical element, made of a nucleus surrounded by electrons.",
    ),
    (
        "Explain what a budget is in one sentence.",
        "",
        "A budget is a plan for how to spend and save money over a period of time.",
    ),
    (
        "Explain what erosion is in one sentence.",
        "",
        "Erosion is the gradual wearing away of rock or soil by wind, water, or ice.",
    ),
    (
        "Explain what a metaphor is in one sentence.",
        "",
        "A metaphor is a figure of speech that describes something by saying it is something else, as in "
        '"time is a thief."',
    ),
    (
        "Explain what friction is in one sentence.",
        "",
        "Friction is the force that resists motion when two surfaces rub against each other.",
    ),
    (
        "Explain what an algorithm is in one sentence.",
        "",
        "An algorithm is a step-by-step set of instructions for solving a problem or completing a task.",
    ),
    ("What is the capital of France?", "", "Paris"),
    ("What is the capital of Japan?", "", "Tokyo"),
    ("What is the capital of Italy?", "", "Rome"),
    ("What is the capital of Canada?", "", "Ottawa"),
    ("What is the capital of Australia?", "", "Canberra"),
    ("What is the capital of Kenya?", "", "Nairobi"),
    ("Which planet is the largest in the solar system?", "", "Jupiter"),
    ("Which planet is known as the Red Planet?", "", "Mars"),
    ("What gas do plants absorb from the air to make food?", "", "Carbon dioxide"),
    ("What is the chemical symbol for gold?", "", "Au"),
    ("Who wrote Romeo and Juliet?", "", "William Shakespeare"),
    ("At what temperature does water boil at sea level, in degrees Celsius?", "", "100 degrees Celsius"),
    ("Which organ pumps blood through the human body?", "", "The heart"),
    ("How many sides does a hexagon have?", "", "Six"),
    (
        "Rewrite the sentence in the past tense.",
        "She walks to school every morning.",
        "She walked to school every morning.",
    ),
    ("Fix the grammar in this sentence.", "He don't like apples.", "He doesn't like apples."),
    ("Fix the grammar in this sentence.", "They was late for the bus.", "They were late for the bus."),
    ("Rewrite this request to sound more formal.", "Can you send me the file?", "Could you please send me the file?"),
    ("Turn this sentence into a question.", "The train leaves at noon.", "Does the train leave at noon?"),
    (
        "Classify the sentiment of this review as positive or negative.",
        "The food was cold and the service was slow.",
        "Negative",
    ),
    (
        "Classify the sentiment of this review as positive or negative.",
        "The staff were friendly and the room was spotless.",
        "Positive",
    ),
    (
        "Summarize the text in one sentence.",
        "The town library will close for two weeks in July while workers replace the roof. Books can still be "
        "returned through the drop box, and the reading room will reopen on August 1.",
        "The library closes for two weeks in July for roof repairs but the drop box stays open.",
    ),
    (
        "Summarize the text in one sentence.",
        "Regular exercise strengthens the heart and muscles. It also improves sleep and mood, and even short "
        "daily walks can make a difference.",
        "Regular exercise, even short daily walks, improves physical health, sleep, and mood.",
    ),
    ("Translate into French.", "Thank you", "Merci"),
    ("Translate into French.", "Good morning", "Bonjour"),
    ("Translate into Spanish.", "Hello", "Hola"),
    ("Translate into Spanish.", "Thank you", "Gracias"),
    (
        "Write a one-sentence thank-you note to a neighbor who watered your plants.",
        "",
        "Thank you so much for watering my plants while I was away; they look wonderful!",
    ),
    ("Suggest a name for a pet goldfish.", "", "Bubbles"),
    ("Give one tip for sleeping better.", "", "Go to bed and wake up at the same time every day, even on weekends."),
    ("Give one tip for saving money.", "", "Set aside a fixed part of each paycheck before spending on anything else."),
    ("Write a haiku about rain.", "", "Soft rain on the roof\nwhispers to the sleeping town\npuddles hold the sky"),
    ("Name the three primary colors used in painting.", "", "Red, yellow, and blue"),
    (
        "Write a short, friendly greeting for the start of an email to a colleague.",
        "",
        "Hi Sam, I hope your week is going well.",
    ),
    ("Suggest a title for a children's story about a lost kitten.", "", "The Kitten Who Found Her Way Home"),
    ("Name a fruit that is yellow when ripe.", "", "Banana"),
    ("Name an animal that lives in the ocean.", "", "Dolphin"),
    ("Describe the color of a clear daytime sky in one word.", "", "Blue"),
    ("Give an example of a renewable energy source.", "", "Solar power"),
]


# -- assembly ----------------------------------------------------------------------------------------
FAMILIES = VERIFIABLE_FAMILIES + ["open_ended"]


def _row(inst: str, inp: str, out: str, family: str, verifiable: bool) -> dict:
    return {"instruction": inst, "input": inp, "output": out, "family": family, "verifiable": verifiable}


def generate(seed: int = DEFAULT_SEED, per_family: int = DEFAULT_PER_FAMILY) -> list[dict]:
    """All rows for `seed`: `per_family` distinct rows of each verifiable family plus the open-ended set,
    shuffled. The same arguments always give the same list."""
    if per_family < 1:
        raise ValueError(f"per_family must be at least 1, got {per_family}")
    rows = [_row(*t, "open_ended", False) for t in OPEN_ENDED]
    seen = {(r["instruction"], r["input"]) for r in rows}
    for family, make in GENERATORS.items():
        # A Random per family, seeded by name: changing one family leaves the others' rows as they were.
        rng = random.Random(f"{seed}:{family}")
        made, misses = 0, 0
        while made < per_family:
            inst, inp, out = make(rng)
            if (inst, inp) in seen:
                # Long runs of repeats mean the family's space is used up, not bad luck.
                misses += 1
                if misses > 10_000:
                    raise ValueError(
                        f"family {family!r} cannot make {per_family} distinct rows (it made {made}); lower --per-family"
                    )
                continue
            misses = 0
            seen.add((inst, inp))
            rows.append(_row(inst, inp, out, family, True))
            made += 1
    # Families interleaved, so a prefix of the file (e.g. a max_samples cut) still covers all of them.
    random.Random(f"{seed}:shuffle").shuffle(rows)
    return rows


# -- multi-turn conversations (a small section beside the Alpaca tasks) ------------------------------
# Each conversation's last answer depends on an earlier turn, so a model that ignores the history cannot
# get it right; a filler exchange in between makes "repeat the previous message" fail too. Written as OpenAI
# `messages` rows with `family` and `verifiable`, scored on the last assistant turn (evaluate.py).
Conversation = list[tuple[str, str]]  # (user, assistant) exchanges; the last assistant text is the answer


def recall_word(rng: random.Random) -> Conversation:
    word = rng.choice(WORDS)
    filler = _filler_sum(rng)
    ask = rng.choice(["Which word did I ask you to remember?", "What was the word from before?"])
    return [(f"Remember this word: {word}.", "OK."), filler, (ask, word)]


def running_total(rng: random.Random) -> Conversation:
    total = rng.randint(10, 60)
    turns = [(f"Start a running total at {total}.", str(total))]
    for _ in range(rng.randint(1, 2)):
        n = rng.randint(1, 9)
        if rng.random() < 0.5 or total - n < 0:
            total += n
            turns.append((f"Add {n}.", str(total)))
        else:
            total -= n
            turns.append((f"Subtract {n}.", str(total)))
    return turns + [(rng.choice(["What is the total now?", "Say the running total."]), str(total))]


def name_recall(rng: random.Random) -> Conversation:
    name = rng.choice(FIRST_NAMES)
    city = rng.choice(CITIES)
    ask, answer = rng.choice(
        [
            ("What is the first letter of my name?", name[0]),
            ("Which city do I live in?", city),
            ("What is my name?", name),
        ]
    )
    return [(f"Hi, I am {name} and I live in {city}.", f"Nice to meet you, {name}."), _filler_sum(rng), (ask, answer)]


def _filler_sum(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return (f"Quick check: what is {a} + {b}?", str(a + b))


CONVERSATION_FAMILIES: dict[str, Callable[[random.Random], Conversation]] = {
    "recall_word": recall_word,
    "running_total": running_total,
    "name_recall": name_recall,
}


def generate_conversations(seed: int = DEFAULT_SEED, per_family: int = 200) -> list[dict]:
    """`per_family` distinct conversations of each multi-turn family, shuffled; deterministic like generate()."""
    if per_family < 1:
        raise ValueError(f"per_family must be at least 1, got {per_family}")
    rows, seen = [], set()
    for family, make in CONVERSATION_FAMILIES.items():
        rng = random.Random(f"{seed}:{family}")
        made, misses = 0, 0
        while made < per_family:
            turns = make(rng)
            if tuple(turns) in seen:
                misses += 1
                if misses > 10_000:
                    raise ValueError(
                        f"family {family!r} cannot make {per_family} distinct conversations; lower the count"
                    )
                continue
            misses = 0
            seen.add(tuple(turns))
            msgs = [{"role": r, "content": c} for u, a in turns for r, c in (("user", u), ("assistant", a))]
            rows.append({"messages": msgs, "family": family, "verifiable": True})
            made += 1
    random.Random(f"{seed}:conversations").shuffle(rows)
    return rows


def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_atomic(path: Path, text: str) -> None:
    """Write beside the target, then rename, so an interrupted run never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # newline="" keeps "\n" on every platform, so the shipped file is byte-identical everywhere.
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the data file is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
