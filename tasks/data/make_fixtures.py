"""Writes the handmade task fixtures in this folder: a dozen rows per dataset, in exactly the columns (and
nesting) of the Hugging Face hub's parquet files, so that source="fixture" and source="hub" share one code path.
The questions are easy and their answers are correct, but they are not the benchmarks: scores on them are an
"embedded fixture, not comparable to published numbers".

    python tasks/data/make_fixtures.py        # rewrites the .parquet files next to this script
"""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).parent

# ---------------------------------------------------------------------------------------------------------
# ARC: (question, choices, answer label); labels default to A, B, C, ...; one row uses 1-4 like some real rows

ARC = {
    "arc_easy_test": [
        ("Which of these is a source of light?", ["the Moon", "a mirror", "the Sun", "a window"], "C"),
        ("What do plants take in from the air to make their food?",
         ["oxygen", "carbon dioxide", "nitrogen", "helium"], "B"),
        ("At what temperature does pure water freeze, in degrees Celsius?", ["0", "32", "100", "-10"], "A"),
        ("Which part of a plant takes in water from the soil?", ["the leaves", "the flowers", "the roots",
                                                                  "the seeds"], "C"),
        ("Which of these animals is a mammal?", ["shark", "dolphin", "trout", "octopus"], "B"),
        ("Which force pulls objects toward the center of Earth?", ["magnetism", "friction", "gravity",
                                                                    "electricity"], "C"),
        ("Which state of matter has a definite shape?", ["solid", "liquid", "gas"], "A"),
        ("About how many hours does it take Earth to rotate once on its axis?", ["1", "12", "24", "365"], "C"),
        ("Which organ pumps blood through the human body?", ["the lungs", "the heart", "the stomach",
                                                              "the brain"], ("1", "2", "3", "4"), "2"),
        ("Which of these is a renewable resource?", ["coal", "oil", "natural gas", "wind"], "D"),
        ("Which gas makes up most of Earth's atmosphere?", ["oxygen", "nitrogen", "carbon dioxide", "argon"], "B"),
        ("A student pushes a toy car and it starts to roll. What made the car move?",
         ["a force", "a sound", "light", "heat"], "A"),
    ],
    "arc_easy_train": [
        ("Which tool is used to measure temperature?", ["a ruler", "a thermometer", "a balance",
                                                         "a stopwatch"], "B"),
        ("What does a caterpillar change into?", ["a beetle", "a spider", "a butterfly", "a worm"], "C"),
        ("Which material is the best conductor of electricity?", ["rubber", "wood", "plastic", "copper"], "D"),
        ("What causes day and night on Earth?", ["Earth rotating on its axis", "Earth orbiting the Sun",
                                                  "the Moon orbiting Earth", "clouds covering the Sun"], "A"),
        ("Which of these animals hatches from an egg?", ["a cow", "a chicken", "a dog", "a horse"], "B"),
        ("Which sense organ is used for hearing?", ["the eyes", "the nose", "the ears", "the tongue"], "C"),
        ("At sea level, water boils at what temperature in degrees Celsius?", ["50", "80", "100", "212"], "C"),
        ("Which planet is closest to the Sun?", ["Mercury", "Venus", "Earth", "Mars"], "A"),
        ("When water evaporates, it changes from a liquid into a", ["solid", "gas", "metal"], "B"),
        ("Which of these is a producer in a food chain?", ["a rabbit", "a fox", "a hawk", "grass"], "D"),
        ("Which ends of two bar magnets pull toward each other?", ["two north poles", "two south poles",
                                                                    "a north pole and a south pole"], "C"),
        ("What do bees collect from flowers to make honey?", ["nectar", "seeds", "leaves", "bark"], "A"),
    ],
    "arc_challenge_test": [
        ("A ball is thrown straight up. What is its speed at the very top of its path?",
         ["its greatest", "zero", "the same as when it was thrown", "increasing"], "B"),
        ("Which process in cells releases energy stored in glucose?", ["photosynthesis", "cellular respiration",
                                                                        "osmosis", "mitosis"], "B"),
        ("Which of these is a chemical change?", ["ice melting", "paper being cut", "iron rusting",
                                                  "sugar dissolving in water"], "C"),
        ("Why does the Moon seem to change shape during a month?",
         ["Earth's shadow covers a different part of it each night",
          "we see different amounts of its sunlit half as it orbits Earth",
          "clouds block part of it", "the Moon grows and shrinks"], "B"),
        ("An organism has cells with a nucleus and a cell wall, and it makes its own food. It is most likely a",
         ["plant", "animal", "bacterium", "mushroom"], "A"),
        ("Which layer of Earth is liquid?", ["the crust", "the mantle", "the outer core", "the inner core"], "C"),
        ("Through which of these does sound travel fastest?", ["air", "water", "steel", "a vacuum"], "C"),
        ("What is the main job of ribosomes in a cell?", ["making proteins", "storing water",
                                                          "controlling the cell", "making sugar from light"], "A"),
        ("Which trait is inherited rather than learned?", ["speaking a language", "riding a bicycle",
                                                           "eye color", "a scar on the knee"], "C"),
        ("What does a balanced chemical equation show about mass?", ["it is created", "it is destroyed",
                                                                     "it is conserved", "it doubles"], "C"),
        ("Which energy change happens in a solar panel?", ["light to electrical", "electrical to light",
                                                           "chemical to heat", "sound to electrical"], "A"),
        ("What mainly causes the ocean tides on Earth?", ["wind", "the Moon's gravity", "earthquakes",
                                                          "the rotation of the Sun"], "B"),
    ],
    "arc_challenge_train": [
        ("Which best describes a mixture?",
         ["substances combined physically that can be separated", "a single element",
          "atoms bonded in a fixed ratio", "a pure compound"], "A"),
        ("Which of these is a physical property of copper?", ["it reacts with nitric acid",
                                                              "its reddish-brown color",
                                                              "it forms a green coating in moist air",
                                                              "it combines with oxygen when heated"], "B"),
        ("Which unit is used to measure force?", ["the joule", "the watt", "the newton", "the meter"], "C"),
        ("Which gas is released by plants during photosynthesis?", ["carbon dioxide", "nitrogen", "methane",
                                                                     "oxygen"], "D"),
        ("In which type of rock are fossils most often found?", ["igneous", "sedimentary", "metamorphic"], "B"),
        ("Which part of a cell controls its activities?", ["the cell membrane", "the nucleus", "the cytoplasm",
                                                           "the vacuole"], "B"),
        ("Which of these animals is a vertebrate?", ["an earthworm", "a jellyfish", "a frog", "a spider"], "C"),
        ("Which organism is a decomposer?", ["a deer", "an oak tree", "a hawk", "a mushroom"], "D"),
        ("Which instrument measures air pressure?", ["a barometer", "a thermometer", "an anemometer",
                                                     "a rain gauge"], "A"),
        ("An object travels 100 meters in 20 seconds. What is its average speed?",
         ["2 m/s", "5 m/s", "20 m/s", "120 m/s"], "B"),
        ("Which planet is known as the Red Planet?", ["Venus", "Jupiter", "Mars", "Saturn"], "C"),
        ("Which property of a sound wave determines its pitch?", ["amplitude", "frequency", "speed",
                                                                   "direction"], "B"),
    ],
}


def arc_table(name: str, rows) -> pa.Table:
    ids, questions, choices, answers = [], [], [], []
    for i, row in enumerate(rows):
        question, texts, *labels, answer = row
        labels = list(labels[0]) if labels else [chr(ord("A") + k) for k in range(len(texts))]
        ids.append(f"fixture_{name}_{i:02d}")
        questions.append(question)
        choices.append({"text": texts, "label": labels})
        answers.append(answer)
    choice_type = pa.struct([("text", pa.list_(pa.string())), ("label", pa.list_(pa.string()))])
    return pa.table({"id": pa.array(ids, pa.string()), "question": pa.array(questions, pa.string()),
                     "choices": pa.array(choices, choice_type), "answerKey": pa.array(answers, pa.string())})


# ---------------------------------------------------------------------------------------------------------
# MMLU: (subject, question, 4 choices, index of the answer)

MMLU_TEST = [
    ("elementary_mathematics", "What is 7 times 8?", ["54", "56", "58", "64"], 1),
    ("high_school_geography", "What is the capital city of Australia?",
     ["Sydney", "Melbourne", "Canberra", "Perth"], 2),
    ("astronomy", "Which is the largest planet in the Solar System?", ["Jupiter", "Saturn", "Earth", "Neptune"], 0),
    ("high_school_chemistry", "What is the chemical symbol for gold?", ["Ag", "Gd", "Go", "Au"], 3),
    ("high_school_computer_science", "How many bits are in one byte?", ["4", "8", "16", "32"], 1),
    ("high_school_biology", "Which organelle produces most of a cell's ATP?",
     ["the nucleus", "the ribosome", "the Golgi apparatus", "the mitochondrion"], 3),
    ("high_school_physics", "What is the SI unit of electric current?",
     ["the volt", "the ohm", "the ampere", "the watt"], 2),
    ("high_school_us_history", "Who was the first President of the United States?",
     ["George Washington", "Thomas Jefferson", "John Adams", "Abraham Lincoln"], 0),
    ("high_school_mathematics", "What is the derivative of x^2 with respect to x?", ["x", "2x", "x^2 / 2", "2"], 1),
    ("philosophy", "Who wrote the Republic?", ["Aristotle", "Socrates", "Kant", "Plato"], 3),
    ("high_school_macroeconomics", "Inflation is a sustained increase in",
     ["the general price level", "unemployment", "real GDP", "interest rates"], 0),
    ("anatomy", "How many chambers does the human heart have?", ["2", "3", "4", "5"], 2),
    ("college_computer_science", "Which data structure removes the most recently added item first?",
     ["a queue", "a stack", "a hash table", "a binary search tree"], 1),
    ("college_mathematics", "What is the smallest prime number?", ["0", "1", "2", "3"], 2),
    ("high_school_world_history", "In which year did World War II end?", ["1918", "1939", "1945", "1950"], 2),
    ("global_facts", "Which is the most populous country in Africa?", ["Egypt", "Nigeria", "Ethiopia", "Kenya"], 1),
]

# The auxiliary_train rows: other multiple-choice sets, subject left empty as on the hub
MMLU_AUX = [
    ("What color do you get by mixing blue and yellow paint?", ["green", "purple", "orange", "brown"], 0),
    ("How many days are in a leap year?", ["364", "365", "366", "367"], 2),
    ("At what temperature does water freeze in degrees Fahrenheit?", ["0", "32", "100", "212"], 1),
    ("Which animal has a trunk?", ["a giraffe", "an elephant", "a rhinoceros", "a hippopotamus"], 1),
    ("What is 15 + 27?", ["32", "42", "43", "52"], 1),
    ("Which instrument usually has 88 keys?", ["a guitar", "a violin", "a piano", "a flute"], 2),
    ("Which gas do people breathe out that plants use to make food?",
     ["oxygen", "nitrogen", "hydrogen", "carbon dioxide"], 3),
    ("Which word means the opposite of 'ancient'?", ["old", "modern", "historic", "antique"], 1),
    ("Which shape has exactly three sides?", ["a square", "a triangle", "a circle", "a hexagon"], 1),
    ("Which is the largest ocean on Earth?", ["the Atlantic", "the Indian", "the Arctic", "the Pacific"], 3),
    ("What is the plural of 'mouse'?", ["mouses", "mice", "mouse", "meese"], 1),
    ("Which of these lengths is the longest?", ["a centimeter", "a meter", "a kilometer", "a millimeter"], 2),
]


def mmlu_test_table() -> pa.Table:
    return pa.table({
        "question": pa.array([q for _, q, _, _ in MMLU_TEST], pa.string()),
        "subject": pa.array([s for s, _, _, _ in MMLU_TEST], pa.string()),
        "choices": pa.array([c for _, _, c, _ in MMLU_TEST], pa.list_(pa.string())),
        "answer": pa.array([a for _, _, _, a in MMLU_TEST], pa.int64()),
    })


def mmlu_aux_table() -> pa.Table:
    # the hub's auxiliary_train parquet has a single struct column "train" (field order as on the hub)
    row = pa.struct([("answer", pa.int64()), ("choices", pa.list_(pa.string())), ("question", pa.string()),
                     ("subject", pa.string())])
    rows = [{"answer": a, "choices": c, "question": q, "subject": ""} for q, c, a in MMLU_AUX]
    return pa.table({"train": pa.array(rows, row)})


# ---------------------------------------------------------------------------------------------------------
# GSM8K: (question, solution with <<expression=result>> calculator annotations and a final "#### answer")

GSM8K = {
    "gsm8k_main_test": [
        ("Maya has 3 boxes of pencils with 12 pencils in each box. She gives away 9 pencils. How many pencils "
         "does she have left?",
         "Maya starts with 3 * 12 = <<3*12=36>>36 pencils.\nAfter giving some away she has 36 - 9 = <<36-9=27>>27 "
         "pencils.\n#### 27"),
        ("A baker makes 48 muffins and puts them into bags of 6. He sells each bag for $4. How much money does he "
         "make if he sells every bag?",
         "He fills 48 / 6 = <<48/6=8>>8 bags.\nHe makes 8 * 4 = $<<8*4=32>>32.\n#### 32"),
        ("Tom reads 15 pages every day. How many pages does he read in 2 weeks?",
         "Two weeks is 2 * 7 = <<2*7=14>>14 days.\nHe reads 15 * 14 = <<15*14=210>>210 pages.\n#### 210"),
        ("A shirt costs $25 and a pair of jeans costs twice as much. How much do 2 shirts and 1 pair of jeans "
         "cost together?",
         "The jeans cost 25 * 2 = $<<25*2=50>>50.\nTwo shirts cost 2 * 25 = $<<2*25=50>>50.\nTogether they cost "
         "50 + 50 = $<<50+50=100>>100.\n#### 100"),
        ("A train travels at 80 kilometers per hour for 3 hours and then at 60 kilometers per hour for 2 hours. "
         "How far does it travel in total?",
         "In the first part it travels 80 * 3 = <<80*3=240>>240 km.\nIn the second part it travels 60 * 2 = "
         "<<60*2=120>>120 km.\nIn total it travels 240 + 120 = <<240+120=360>>360 km.\n#### 360"),
        ("Lena has $50. She buys 3 books that cost $12 each. How much money does she have left?",
         "The books cost 3 * 12 = $<<3*12=36>>36.\nShe has 50 - 36 = $<<50-36=14>>14 left.\n#### 14"),
        ("A farm collects 1,250 eggs each day. How many eggs does it collect in 30 days?",
         "It collects 1250 * 30 = <<1250*30=37500>>37500 eggs.\n#### 37500"),
        ("There are 24 students in a class. One third of them walk to school and the rest take the bus. How "
         "many students take the bus?",
         "24 / 3 = <<24/3=8>>8 students walk.\nSo 24 - 8 = <<24-8=16>>16 students take the bus.\n#### 16"),
        ("A rectangular garden is 12 meters long and 7 meters wide. What is its perimeter in meters?",
         "The perimeter is 2 * (12 + 7) = <<2*(12+7)=38>>38 meters.\n#### 38"),
        ("Sam earns $9 an hour. He works 6 hours on Saturday and 5 hours on Sunday. How much does he earn over "
         "the weekend?",
         "He works 6 + 5 = <<6+5=11>>11 hours.\nHe earns 11 * 9 = $<<11*9=99>>99.\n#### 99"),
        ("Apples cost $0.50 each. How many dollars do 14 apples cost?",
         "14 apples cost 14 * 0.5 = $<<14*0.5=7>>7.\n#### 7"),
        ("A tank holds 200 liters of water. A leak drains 15 liters every hour. How many liters are left after "
         "8 hours?",
         "The leak drains 15 * 8 = <<15*8=120>>120 liters.\n200 - 120 = <<200-120=80>>80 liters are left.\n#### 80"),
    ],
    "gsm8k_main_train": [
        ("Ali has 5 bags with 7 marbles in each bag. He finds 4 more marbles. How many marbles does he have?",
         "The bags hold 5 * 7 = <<5*7=35>>35 marbles.\nWith the ones he found he has 35 + 4 = <<35+4=39>>39 "
         "marbles.\n#### 39"),
        ("A pizza is cut into 8 slices. If 3 friends each eat 2 slices, how many slices are left?",
         "They eat 3 * 2 = <<3*2=6>>6 slices.\n8 - 6 = <<8-6=2>>2 slices are left.\n#### 2"),
        ("Nora saves $15 each week. How many weeks does she need to save $120?",
         "She needs 120 / 15 = <<120/15=8>>8 weeks.\n#### 8"),
        ("A movie ticket costs $11 and a popcorn costs $6. How much do 4 tickets and 2 popcorns cost?",
         "The tickets cost 4 * 11 = $<<4*11=44>>44.\nThe popcorn costs 2 * 6 = $<<2*6=12>>12.\nThe total is "
         "44 + 12 = $<<44+12=56>>56.\n#### 56"),
        ("A car uses 1 liter of fuel every 15 kilometers. How many liters does it need for a 345-kilometer trip?",
         "It needs 345 / 15 = <<345/15=23>>23 liters.\n#### 23"),
        ("There are 6 rows of chairs with 14 chairs in each row. 9 chairs are broken. How many chairs can be "
         "used?",
         "There are 6 * 14 = <<6*14=84>>84 chairs.\n84 - 9 = <<84-9=75>>75 chairs can be used.\n#### 75"),
        ("Kim is 4 years older than her brother, who is 9. How old will Kim be in 5 years?",
         "Kim is 9 + 4 = <<9+4=13>>13 now.\nIn 5 years she will be 13 + 5 = <<13+5=18>>18.\n#### 18"),
        ("A store sells a pack of 12 pens for $3. How many cents does one pen cost?",
         "$3 is 3 * 100 = <<3*100=300>>300 cents.\nOne pen costs 300 / 12 = <<300/12=25>>25 cents.\n#### 25"),
        ("A runner runs 5 kilometers on Monday, twice as far on Tuesday, and 3 kilometers less than Tuesday on "
         "Wednesday. How far does she run over the three days?",
         "On Tuesday she runs 5 * 2 = <<5*2=10>>10 km.\nOn Wednesday she runs 10 - 3 = <<10-3=7>>7 km.\nIn total "
         "she runs 5 + 10 + 7 = <<5+10+7=22>>22 km.\n#### 22"),
        ("A library has 3,400 books. It buys 250 more and gives away 150. How many books does it have now?",
         "After buying it has 3400 + 250 = <<3400+250=3650>>3650 books.\nAfter giving some away it has "
         "3650 - 150 = <<3650-150=3500>>3500 books.\n#### 3500"),
        ("The temperature was 4 degrees Celsius in the morning and fell by 10 degrees by midnight. What was the "
         "temperature at midnight?",
         "At midnight it was 4 - 10 = <<4-10=-6>>-6 degrees Celsius.\n#### -6"),
        ("A recipe uses 3 eggs for every 2 cakes. How many eggs are needed for 10 cakes?",
         "10 cakes is 10 / 2 = <<10/2=5>>5 batches.\nThey need 5 * 3 = <<5*3=15>>15 eggs.\n#### 15"),
    ],
}


def gsm8k_table(rows) -> pa.Table:
    return pa.table({"question": pa.array([q for q, _ in rows], pa.string()),
                     "answer": pa.array([a for _, a in rows], pa.string())})


# ---------------------------------------------------------------------------------------------------------
# HumanEval: prompt (imports, signature, docstring), canonical_solution (the body), test, entry_point

HUMANEVAL = [
    dict(task_id="Fixture/0", entry_point="add",
         prompt='\n\ndef add(a: int, b: int) -> int:\n    """Return the sum of a and b.\n    >>> add(2, 3)\n'
                '    5\n    """\n',
         canonical_solution="    return a + b\n",
         test="\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
              "    assert candidate(0, 0) == 0\n    assert candidate(100, 250) == 350\n"),
    dict(task_id="Fixture/1", entry_point="running_max",
         prompt='from typing import List\n\n\ndef running_max(numbers: List[int]) -> List[int]:\n'
                '    """Return a list whose i-th element is the largest of numbers[0], ..., numbers[i].\n'
                '    >>> running_max([1, 3, 2, 5, 4])\n    [1, 3, 3, 5, 5]\n    """\n',
         canonical_solution="    result = []\n    for n in numbers:\n"
                            "        result.append(n if not result else max(result[-1], n))\n    return result\n",
         test="\n\ndef check(candidate):\n    assert candidate([]) == []\n"
              "    assert candidate([1, 3, 2, 5, 4]) == [1, 3, 3, 5, 5]\n"
              "    assert candidate([-2, -5, -1]) == [-2, -2, -1]\n"),
    dict(task_id="Fixture/2", entry_point="count_vowels",
         prompt='\n\ndef count_vowels(s: str) -> int:\n    """Count the vowels (a, e, i, o, u, in either case) in s.\n'
                '    >>> count_vowels("hello")\n    2\n    """\n',
         canonical_solution="    return sum(1 for c in s.lower() if c in 'aeiou')\n",
         test="\n\ndef check(candidate):\n    assert candidate('hello') == 2\n    assert candidate('') == 0\n"
              "    assert candidate('AEIOU xyz') == 5\n    assert candidate('rhythm') == 0\n"),
    dict(task_id="Fixture/3", entry_point="is_palindrome",
         prompt='\n\ndef is_palindrome(text: str) -> bool:\n'
                '    """Whether text reads the same backwards, ignoring case and anything not a letter or digit.\n'
                '    >>> is_palindrome("Never odd or even")\n    True\n    >>> is_palindrome("hello")\n'
                '    False\n    """\n',
         canonical_solution="    cleaned = [c.lower() for c in text if c.isalnum()]\n"
                            "    return cleaned == cleaned[::-1]\n",
         test="\n\ndef check(candidate):\n    assert candidate('A man, a plan, a canal: Panama') is True\n"
              "    assert candidate('hello') is False\n    assert candidate('') is True\n"
              "    assert candidate('12321') is True\n"),
]


def humaneval_table() -> pa.Table:
    columns = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    return pa.table({c: pa.array([row[c] for row in HUMANEVAL], pa.string()) for c in columns})


# ---------------------------------------------------------------------------------------------------------
# SmolTalk: conversations (a leading system message is allowed), as the hub's "messages" column

def _chat(*turns, system=None):
    roles = ["user", "assistant"] * len(turns)
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": r, "content": t} for r, t in zip(roles, turns)]


SMOLTALK = {
    "smoltalk_train": [
        _chat("What is the capital of France?", "The capital of France is Paris."),
        _chat("Can you give me a synonym for 'happy'?",
              "Sure! Some synonyms for 'happy' are joyful, cheerful, and content."),
        _chat("How many legs does a spider have?", "A spider has eight legs."),
        _chat("Write a haiku about rain.",
              "Soft rain on the roof,\npuddles gather in the street,\nthe garden drinks deep."),
        _chat("What is 12 times 12?", "12 times 12 is 144."),
        _chat("How do I reverse a list in Python?",
              "You can use slicing: `my_list[::-1]` returns a reversed copy. To reverse the list in place, call "
              "`my_list.reverse()`."),
        _chat("Why is the sky blue?",
              "Sunlight is scattered by the molecules in the air, and shorter blue wavelengths are scattered much "
              "more than longer red ones. That scattered blue light reaches our eyes from every direction, so the "
              "sky looks blue."),
        _chat("Translate 'good morning' into Spanish.", "'Good morning' in Spanish is 'buenos días'."),
        _chat("I have eggs, cheese and spinach. What can I cook?",
              "You could make a spinach and cheese omelette: whisk the eggs, cook them in a pan, add the spinach "
              "and cheese, then fold it over once the cheese melts."),
        _chat("What is the boiling point of water at sea level?",
              "At sea level, water boils at 100 degrees Celsius, which is 212 degrees Fahrenheit.",
              "And the freezing point?",
              "Water freezes at 0 degrees Celsius, which is 32 degrees Fahrenheit."),
        _chat("Summarize the story of Cinderella in one sentence.",
              "With help from her fairy godmother, a mistreated young woman attends a royal ball, wins the "
              "prince's heart, and is found again through the glass slipper she left behind."),
        _chat("Give me three tips for better sleep.",
              "1. Go to bed and wake up at the same time every day.\n2. Avoid screens for an hour before bed.\n"
              "3. Keep your bedroom cool, dark and quiet."),
        _chat("What does HTML stand for?", "HTML stands for HyperText Markup Language."),
        _chat("Is a tomato a fruit or a vegetable?",
              "Botanically, a tomato is a fruit because it grows from the flower and contains seeds. In cooking, "
              "it is usually treated as a vegetable."),
        _chat("Hi!", "Hello! How can I help you today?", "Tell me a fun fact.",
              "Octopuses have three hearts: two pump blood through the gills and one pumps it to the rest of the "
              "body."),
        _chat("Can you explain what a prime number is?",
              "A prime number is a whole number greater than 1 whose only divisors are 1 and itself. For example, "
              "2, 3, 5, 7 and 11 are prime, while 4 is not, because 4 = 2 x 2."),
        _chat("Rewrite this sentence to be more formal: 'Gonna be late, sorry!'",
              "I apologize, but I will be arriving late.", system="You are a helpful writing assistant."),
        _chat("What should I pack for a day hike?",
              "Bring water, snacks, sunscreen, a hat, a map or charged phone, a light jacket, and a small first "
              "aid kit.", system="You are a friendly outdoor guide. Keep answers short."),
        _chat("Convert 5 kilometers to miles.", "5 kilometers is about 3.1 miles."),
        _chat("Who wrote 'Romeo and Juliet'?", "'Romeo and Juliet' was written by William Shakespeare.",
              "When was it written?", "It is believed to have been written in the mid-1590s."),
    ],
    "smoltalk_test": [
        _chat("What is the largest mammal?", "The blue whale is the largest mammal, and the largest animal known "
                                              "to have ever lived."),
        _chat("How many minutes are in a day?", "There are 24 x 60 = 1,440 minutes in a day."),
        _chat("Suggest a name for a pet goldfish.", "How about 'Bubbles'? Other fun options are 'Finn' and "
                                                     "'Goldie'."),
        _chat("What is photosynthesis?",
              "Photosynthesis is the process by which plants use sunlight, water and carbon dioxide to make "
              "glucose, releasing oxygen as a by-product."),
        _chat("Say 'thank you' in French.", "'Thank you' in French is 'merci'.",
              system="You are a concise language tutor."),
        _chat("What is the square root of 81?", "The square root of 81 is 9.", "And of 144?",
              "The square root of 144 is 12."),
    ],
}

MESSAGE = pa.struct([("content", pa.string()), ("role", pa.string())])


def smoltalk_table(conversations) -> pa.Table:
    return pa.table({"messages": pa.array(conversations, pa.list_(MESSAGE))})


# ---------------------------------------------------------------------------------------------------------


def tables() -> dict[str, pa.Table]:
    """File name -> table, for every fixture."""
    out = {f"{name}.parquet": arc_table(name, rows) for name, rows in ARC.items()}
    out["mmlu_all_test.parquet"] = mmlu_test_table()
    out["mmlu_auxiliary_train.parquet"] = mmlu_aux_table()
    out.update({f"{name}.parquet": gsm8k_table(rows) for name, rows in GSM8K.items()})
    out["humaneval_test.parquet"] = humaneval_table()
    out.update({f"{name}.parquet": smoltalk_table(rows) for name, rows in SMOLTALK.items()})
    return out


def main():
    for name, table in tables().items():
        pq.write_table(table, HERE / name)
        print(f"{name}: {table.num_rows} rows, columns {table.column_names}")


if __name__ == "__main__":
    main()
