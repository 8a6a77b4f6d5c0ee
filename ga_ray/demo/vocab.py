"""Vocabulary of the demo world: small fact tables the task generator draws from.

Every table is split deterministically into a training part and a HELD-OUT part (every fifth item):
the instruction mixture only uses the training part, the evaluation prompts use the held-out part,
and the base (pre-training) split sees both (it is where the model learns what the words mean).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

# (country, capital)
CAPITALS = [
    ("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Japan", "Tokyo"),
    ("China", "Beijing"), ("India", "New Delhi"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Brazil", "Brasilia"),
    ("Peru", "Lima"), ("Chile", "Santiago"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Russia", "Moscow"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Poland", "Warsaw"), ("Greece", "Athens"),
    ("Turkey", "Ankara"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Hungary", "Budapest"),
    ("Cuba", "Havana"), ("Argentina", "Buenos Aires"), ("Colombia", "Bogota"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("Nepal", "Kathmandu"), ("Ghana", "Accra"), ("Nigeria", "Abuja"), ("Morocco", "Rabat"), ("Iran", "Tehran"),
    ("Denmark", "Copenhagen"), ("Belgium", "Brussels"), ("Australia", "Canberra"), ("Jamaica", "Kingston"), ("Iceland", "Reykjavik"),
]

# (element, symbol)
ELEMENTS = [
    ("gold", "Au"), ("silver", "Ag"), ("iron", "Fe"), ("copper", "Cu"), ("oxygen", "O"), ("hydrogen", "H"),
    ("carbon", "C"), ("nitrogen", "N"), ("helium", "He"), ("sodium", "Na"), ("potassium", "K"), ("calcium", "Ca"),
    ("zinc", "Zn"), ("lead", "Pb"), ("tin", "Sn"), ("neon", "Ne"), ("sulfur", "S"), ("mercury", "Hg"),
    ("nickel", "Ni"), ("chlorine", "Cl"),
]

# (animal, class, legs)
ANIMALS = [
    ("dog", "mammal", 4), ("cat", "mammal", 4), ("horse", "mammal", 4), ("cow", "mammal", 4), ("whale", "mammal", 0),
    ("dolphin", "mammal", 0), ("lion", "mammal", 4), ("tiger", "mammal", 4), ("elephant", "mammal", 4), ("rabbit", "mammal", 4),
    ("mouse", "mammal", 4), ("bear", "mammal", 4), ("wolf", "mammal", 4), ("fox", "mammal", 4), ("goat", "mammal", 4),
    ("eagle", "bird", 2), ("sparrow", "bird", 2), ("owl", "bird", 2), ("penguin", "bird", 2), ("parrot", "bird", 2),
    ("duck", "bird", 2), ("swan", "bird", 2), ("crow", "bird", 2), ("robin", "bird", 2), ("pigeon", "bird", 2),
    ("salmon", "fish", 0), ("trout", "fish", 0), ("shark", "fish", 0), ("tuna", "fish", 0), ("cod", "fish", 0),
    ("snake", "reptile", 0), ("lizard", "reptile", 4), ("turtle", "reptile", 4), ("crocodile", "reptile", 4), ("gecko", "reptile", 4),
    ("ant", "insect", 6), ("bee", "insect", 6), ("beetle", "insect", 6), ("butterfly", "insect", 6), ("wasp", "insect", 6),
    ("frog", "amphibian", 4), ("toad", "amphibian", 4), ("newt", "amphibian", 4), ("salamander", "amphibian", 4), ("spider", "arachnid", 8),
]
ANIMAL_CLASSES = ["mammal", "bird", "fish", "reptile", "insect", "amphibian"]

# (food, category)
FOODS = [
    ("apple", "fruit"), ("banana", "fruit"), ("cherry", "fruit"), ("grape", "fruit"), ("lemon", "fruit"), ("mango", "fruit"),
    ("pear", "fruit"), ("peach", "fruit"), ("plum", "fruit"), ("melon", "fruit"),
    ("carrot", "vegetable"), ("potato", "vegetable"), ("onion", "vegetable"), ("lettuce", "vegetable"), ("spinach", "vegetable"),
    ("cabbage", "vegetable"), ("broccoli", "vegetable"), ("pumpkin", "vegetable"), ("celery", "vegetable"), ("radish", "vegetable"),
    ("rice", "grain"), ("wheat", "grain"), ("oats", "grain"), ("barley", "grain"), ("corn", "grain"),
    ("cheese", "dairy"), ("milk", "dairy"), ("butter", "dairy"), ("yogurt", "dairy"), ("cream", "dairy"),
]
FOOD_CATEGORIES = ["fruit", "vegetable", "grain", "dairy"]

# (instrument, family)
INSTRUMENTS = [
    ("violin", "string"), ("guitar", "string"), ("cello", "string"), ("harp", "string"), ("banjo", "string"),
    ("flute", "wind"), ("trumpet", "wind"), ("clarinet", "wind"), ("oboe", "wind"), ("saxophone", "wind"),
    ("drum", "percussion"), ("cymbal", "percussion"), ("xylophone", "percussion"), ("tambourine", "percussion"), ("gong", "percussion"),
]
INSTRUMENT_FAMILIES = ["string", "wind", "percussion"]

# (sport, kind)
SPORTS = [
    ("football", "team"), ("basketball", "team"), ("hockey", "team"), ("volleyball", "team"), ("rugby", "team"),
    ("cricket", "team"), ("baseball", "team"), ("handball", "team"), ("polo", "team"), ("water polo", "team"),
    ("tennis", "individual"), ("golf", "individual"), ("boxing", "individual"), ("swimming", "individual"), ("archery", "individual"),
    ("cycling", "individual"), ("skiing", "individual"), ("fencing", "individual"), ("surfing", "individual"), ("judo", "individual"),
]
SPORT_KINDS = ["team", "individual"]

# (thing, colour)
COLOURS = [
    ("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"), ("a banana", "yellow"),
    ("a ripe tomato", "red"), ("chocolate", "brown"), ("a carrot", "orange"), ("milk", "white"), ("a lemon", "yellow"),
    ("a lime", "green"), ("the sea", "blue"), ("a crow", "black"), ("a pumpkin", "orange"), ("an eggplant", "purple"),
]

# (verb base, 3rd person singular, past, past participle)
VERBS = [
    ("eat", "eats", "ate", "eaten"), ("chase", "chases", "chased", "chased"), ("see", "sees", "saw", "seen"),
    ("take", "takes", "took", "taken"), ("write", "writes", "wrote", "written"), ("paint", "paints", "painted", "painted"),
    ("build", "builds", "built", "built"), ("find", "finds", "found", "found"), ("carry", "carries", "carried", "carried"),
    ("wash", "washes", "washed", "washed"), ("open", "opens", "opened", "opened"), ("catch", "catches", "caught", "caught"),
    ("throw", "throws", "threw", "thrown"), ("drive", "drives", "drove", "driven"), ("clean", "cleans", "cleaned", "cleaned"),
    ("cook", "cooks", "cooked", "cooked"), ("fix", "fixes", "fixed", "fixed"), ("sell", "sells", "sold", "sold"),
    ("buy", "buys", "bought", "bought"), ("bring", "brings", "brought", "brought"), ("hold", "holds", "held", "held"),
    ("draw", "draws", "drew", "drawn"), ("break", "breaks", "broke", "broken"), ("watch", "watches", "watched", "watched"),
    ("push", "pushes", "pushed", "pushed"),
]

# verb base -> objects that make sense with it
VERB_OBJECTS = {
    "eat": ["the cake", "the soup", "the apple", "the bread", "the pie"],
    "chase": ["the ball", "the cat", "the bus", "the kite", "the dog"],
    "see": ["the bridge", "the boat", "the house", "the moon", "the tower"],
    "take": ["the map", "the bus", "the box", "the key", "the photo"],
    "write": ["the letter", "the story", "the report", "the poem", "the note"],
    "paint": ["the fence", "the door", "the wall", "the picture", "the boat"],
    "build": ["the house", "the bridge", "the shed", "the wall", "the tower"],
    "find": ["the key", "the map", "the ring", "the book", "the wallet"],
    "carry": ["the box", "the bag", "the chair", "the basket", "the lamp"],
    "wash": ["the car", "the dishes", "the window", "the dog", "the shirt"],
    "open": ["the door", "the window", "the box", "the gate", "the letter"],
    "catch": ["the ball", "the fish", "the train", "the bus", "the frisbee"],
    "throw": ["the ball", "the stick", "the frisbee", "the stone", "the dice"],
    "drive": ["the car", "the truck", "the bus", "the tractor", "the van"],
    "clean": ["the room", "the kitchen", "the table", "the floor", "the garage"],
    "cook": ["the dinner", "the rice", "the soup", "the pasta", "the eggs"],
    "fix": ["the bike", "the lamp", "the roof", "the clock", "the radio"],
    "sell": ["the car", "the house", "the bike", "the painting", "the piano"],
    "buy": ["the bread", "the tickets", "the shoes", "the milk", "the flowers"],
    "bring": ["the cake", "the chairs", "the map", "the tea", "the keys"],
    "hold": ["the baby", "the rope", "the cup", "the flag", "the ladder"],
    "draw": ["the map", "the tree", "the horse", "the house", "the picture"],
    "break": ["the glass", "the window", "the plate", "the record", "the vase"],
    "watch": ["the game", "the film", "the birds", "the parade", "the stars"],
    "push": ["the cart", "the door", "the car", "the swing", "the pram"],
}

NAMES = [
    "Tom", "Anna", "Maria", "James", "Lucy", "Omar", "Priya", "Ken", "Sara", "David",
    "Emma", "Leo", "Nina", "Paul", "Rosa", "Ivan", "Mei", "Carlos", "Fatima", "George",
    "Hana", "Jack", "Olga", "Sam", "Zara",
]
ROLE_SUBJECTS = ["the teacher", "the chef", "the farmer", "the doctor", "the pilot", "my sister", "our neighbor", "the boy", "the girl", "the artist"]
PLURAL_SUBJECTS = ["the children", "my friends", "the workers", "the students", "my parents"]
TIME_ADVERBS_PRESENT = ["every day", "every morning", "on Sundays", "after school", "every week", "at night"]
TIME_ADVERBS_PAST = ["yesterday", "last week", "last night", "this morning", "two days ago"]

PROFESSIONS = ["teacher", "baker", "nurse", "painter", "farmer", "pilot", "writer", "gardener", "doctor", "musician", "builder", "chef"]
CITIES = [c for _, c in CAPITALS]

POS_ADJ = ["wonderful", "delicious", "friendly", "amazing", "excellent", "lovely", "fantastic", "great", "perfect", "charming", "pleasant", "superb"]
NEG_ADJ = ["terrible", "awful", "rude", "bland", "broken", "dirty", "boring", "disappointing", "horrible", "noisy", "slow", "cold"]
NEU_ADJ = ["okay", "average", "fine", "ordinary", "acceptable"]
REVIEW_THINGS = ["the pizza", "the hotel", "the movie", "the service", "the phone", "the concert", "the book", "the cafe",
                 "the shoes", "the game", "the museum", "the train ride", "the pasta", "the headphones", "the tour"]

# word -> (synonyms, antonyms)
SYN_ANT = {
    "happy": (["glad", "cheerful", "joyful"], ["sad", "unhappy", "gloomy"]),
    "sad": (["unhappy", "gloomy", "miserable"], ["happy", "glad", "cheerful"]),
    "big": (["large", "huge", "giant"], ["small", "tiny", "little"]),
    "small": (["tiny", "little", "minor"], ["big", "large", "huge"]),
    "fast": (["quick", "rapid", "swift"], ["slow", "sluggish", "lazy"]),
    "smart": (["clever", "bright", "wise"], ["foolish", "silly", "dull"]),
    "angry": (["mad", "upset", "furious"], ["calm", "pleased", "content"]),
    "cold": (["chilly", "icy", "cool"], ["hot", "warm", "heated"]),
    "hot": (["warm", "burning", "heated"], ["cold", "cool", "chilly"]),
    "easy": (["simple", "plain", "effortless"], ["hard", "difficult", "tough"]),
    "hard": (["difficult", "tough", "tricky"], ["easy", "simple", "soft"]),
    "old": (["aged", "ancient", "elderly"], ["new", "young", "modern"]),
    "new": (["fresh", "modern", "recent"], ["old", "ancient", "used"]),
    "rich": (["wealthy", "affluent", "prosperous"], ["poor", "broke", "needy"]),
    "brave": (["bold", "fearless", "daring"], ["scared", "timid", "fearful"]),
    "calm": (["quiet", "peaceful", "still"], ["angry", "noisy", "wild"]),
    "loud": (["noisy", "booming", "deafening"], ["quiet", "silent", "soft"]),
    "clean": (["tidy", "neat", "spotless"], ["dirty", "messy", "filthy"]),
    "strong": (["powerful", "mighty", "sturdy"], ["weak", "feeble", "frail"]),
    "kind": (["nice", "gentle", "caring"], ["cruel", "mean", "harsh"]),
    "quiet": (["silent", "hushed", "still"], ["loud", "noisy", "rowdy"]),
    "pretty": (["lovely", "beautiful", "attractive"], ["ugly", "plain", "unsightly"]),
    "wet": (["damp", "soaked", "moist"], ["dry", "arid", "parched"]),
    "bright": (["shiny", "vivid", "radiant"], ["dim", "dark", "dull"]),
    "tired": (["sleepy", "weary", "exhausted"], ["rested", "fresh", "lively"]),
    "funny": (["amusing", "comic", "witty"], ["serious", "grave", "solemn"]),
    "empty": (["bare", "vacant", "hollow"], ["full", "packed", "crowded"]),
    "soft": (["gentle", "smooth", "tender"], ["hard", "rough", "firm"]),
    "near": (["close", "nearby", "local"], ["far", "distant", "remote"]),
    "true": (["correct", "right", "accurate"], ["false", "wrong", "untrue"]),
}
RHYMES = {
    "cat": ["hat", "bat", "mat"], "dog": ["log", "fog", "frog"], "sun": ["fun", "run", "bun"], "tree": ["bee", "sea", "key"],
    "cake": ["lake", "bake", "snake"], "light": ["night", "kite", "bright"], "ring": ["king", "sing", "wing"],
    "car": ["star", "jar", "bar"], "boat": ["coat", "goat", "note"], "rain": ["train", "chain", "plane"],
    "bell": ["shell", "well", "tell"], "day": ["play", "way", "hay"], "moon": ["spoon", "tune", "soon"],
    "fish": ["dish", "wish", "swish"], "hill": ["mill", "pill", "still"],
    "bed": ["red", "head", "bread"], "book": ["cook", "look", "hook"], "cold": ["gold", "bold", "old"],
    "door": ["floor", "four", "more"], "game": ["name", "same", "flame"], "hand": ["sand", "band", "land"],
    "mouse": ["house", "blouse", "spouse"], "pen": ["ten", "hen", "men"], "rock": ["sock", "clock", "lock"],
    "top": ["hop", "shop", "stop"],
}

POEM_TOPICS = ["the sea", "the moon", "autumn", "the rain", "a garden", "the city", "winter", "the mountains", "a river",
               "the stars", "spring", "the forest", "a candle", "the wind", "the morning", "a bird", "the desert", "summer",
               "the snow", "an old house", "the harbor", "a lighthouse", "the village", "a meadow", "the clouds", "a train",
               "the ocean", "a lantern", "the valley", "a bridge", "the orchard", "a fox", "the island", "the lake", "a storm",
               "the library", "a window", "the evening", "a market", "the road"]
POEM_ADJ = ["quiet", "bright", "gentle", "silver", "golden", "soft", "wild", "deep", "calm", "cold", "warm", "dark"]
POEM_VERBS = ["whispers", "sings", "shines", "dances", "sleeps", "glows", "waits", "drifts", "hums", "wanders"]
POEM_NOUNS = ["sky", "light", "night", "dawn", "shore", "hill", "song", "dream", "road", "heart"]

# list topics: (category phrase, items)
LIST_TOPICS = [
    ("fruits", ["apples", "bananas", "cherries", "grapes", "mangoes", "pears"]),
    ("vegetables", ["carrots", "potatoes", "onions", "spinach", "broccoli", "peas"]),
    ("farm animals", ["cows", "pigs", "sheep", "goats", "hens", "horses"]),
    ("musical instruments", ["the violin", "the guitar", "the flute", "the drum", "the piano", "the trumpet"]),
    ("team sports", ["football", "basketball", "hockey", "volleyball", "rugby", "cricket"]),
    ("colours", ["red", "blue", "green", "yellow", "purple", "orange"]),
    ("things to pack for a trip", ["a toothbrush", "a passport", "a charger", "a jacket", "a map", "sunscreen"]),
    ("kitchen tools", ["a knife", "a pan", "a spoon", "a whisk", "a kettle", "a grater"]),
    ("school subjects", ["maths", "history", "biology", "music", "art", "geography"]),
    ("hobbies", ["reading", "painting", "gardening", "hiking", "cooking", "chess"]),
    ("birds", ["eagles", "owls", "sparrows", "parrots", "swans", "crows"]),
    ("planets", ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn"]),
    ("ways to save energy", ["turning off lights", "using less hot water", "closing windows", "unplugging chargers", "walking more", "drying clothes outside"]),
    ("healthy breakfast foods", ["oats", "yogurt", "eggs", "fruit", "nuts", "whole grain toast"]),
    ("things to do on a rainy day", ["read a book", "bake cookies", "watch a film", "play a board game", "write a letter", "build a fort"]),
    ("tips for better sleep", ["keep a regular bedtime", "avoid screens late", "keep the room dark", "skip late coffee", "exercise during the day", "read before bed"]),
    ("desert animals", ["camels", "lizards", "scorpions", "foxes", "snakes", "beetles"]),
    ("board games", ["chess", "checkers", "backgammon", "dominoes", "scrabble", "go"]),
    ("garden flowers", ["roses", "tulips", "daisies", "lilies", "sunflowers", "pansies"]),
    ("ocean animals", ["whales", "dolphins", "sharks", "octopuses", "crabs", "seals"]),
]

# processes: (task phrase, steps)
PROCESSES = [
    ("make a cup of tea", ["Boil some water", "Put a tea bag in a cup", "Pour the hot water into the cup", "Wait three minutes", "Remove the tea bag"]),
    ("plant a tree", ["Dig a deep hole", "Place the tree in the hole", "Fill the hole with soil", "Water the tree well"]),
    ("wash your hands", ["Wet your hands with water", "Apply soap", "Scrub for twenty seconds", "Rinse and dry your hands"]),
    ("bake bread", ["Mix flour, yeast, salt and water", "Knead the dough", "Let the dough rise", "Bake it in a hot oven"]),
    ("write a letter", ["Write the date and a greeting", "Write the main message", "Add a closing line", "Sign your name"]),
    ("clean a room", ["Pick up the clutter", "Dust the shelves", "Vacuum the floor", "Take out the trash"]),
    ("make a sandwich", ["Take two slices of bread", "Spread butter on the bread", "Add cheese and lettuce", "Close the sandwich"]),
    ("change a light bulb", ["Turn off the power", "Remove the old bulb", "Screw in the new bulb", "Turn the power back on"]),
    ("boil an egg", ["Put the egg in a pot of water", "Bring the water to a boil", "Cook for eight minutes", "Cool the egg in cold water"]),
    ("pack a suitcase", ["Make a list of what you need", "Fold your clothes", "Put heavy items at the bottom", "Close the suitcase"]),
    ("start a garden", ["Choose a sunny spot", "Prepare the soil", "Plant the seeds", "Water them every day"]),
    ("learn a new word", ["Read the word aloud", "Look up its meaning", "Use it in a sentence", "Review it the next day"]),
    ("make pancakes", ["Mix flour, milk and eggs", "Heat a pan with butter", "Pour in some batter", "Flip the pancake once"]),
    ("wrap a present", ["Measure the paper", "Cut the paper to size", "Fold it around the box", "Tape it and add a bow"]),
    ("fix a flat tire", ["Remove the wheel", "Find the hole", "Patch the tube", "Pump up the tire"]),
    ("feed a cat", ["Wash the bowl", "Fill it with cat food", "Put fresh water out", "Call the cat"]),
    ("brush your teeth", ["Wet the toothbrush", "Add a little toothpaste", "Brush for two minutes", "Rinse your mouth"]),
    ("make a salad", ["Wash the lettuce", "Chop the vegetables", "Mix them in a bowl", "Add the dressing"]),
    ("send an email", ["Open your mail app", "Type the address", "Write the message", "Press send"]),
    ("paint a wall", ["Cover the floor", "Clean the wall", "Apply a first coat", "Add a second coat when dry"]),
    ("set up a tent", ["Find a flat spot", "Lay out the tent", "Insert the poles", "Stake down the corners"]),
    ("make rice", ["Rinse the rice", "Add rice and water to a pot", "Simmer for fifteen minutes", "Let it rest before serving"]),
    ("iron a shirt", ["Heat the iron", "Iron the collar", "Iron the sleeves", "Iron the body of the shirt"]),
    ("water a plant", ["Check if the soil is dry", "Fill a watering can", "Pour water around the base", "Empty the saucer"]),
    ("study for a test", ["Make a study plan", "Review your notes", "Practice with old questions", "Sleep well the night before"]),
]

# (function name, description, python body lines, javascript body lines, prose how-to)
CODE_TASKS = [
    ("total", "returns the sum of a list of numbers", ["def total(numbers):", "    return sum(numbers)"],
     ["function total(numbers) {", "  return numbers.reduce((a, b) => a + b, 0);", "}"],
     "pass the list to the built-in sum function and it returns the total"),
    ("largest", "returns the largest number in a list", ["def largest(numbers):", "    return max(numbers)"],
     ["function largest(numbers) {", "  return Math.max(...numbers);", "}"],
     "call the built-in max function on the list"),
    ("reverse", "reverses a string", ["def reverse(text):", "    return text[::-1]"],
     ["function reverse(text) {", "  return text.split('').reverse().join('');", "}"],
     "slice the string with a step of minus one"),
    ("is_even", "checks whether a number is even", ["def is_even(n):", "    return n % 2 == 0"],
     ["function isEven(n) {", "  return n % 2 === 0;", "}"],
     "check whether the remainder after dividing by two is zero"),
    ("square", "squares a number", ["def square(x):", "    return x * x"],
     ["function square(x) {", "  return x * x;", "}"],
     "multiply the number by itself"),
    ("count_vowels", "counts the vowels in a string", ["def count_vowels(text):", "    return sum(c in 'aeiou' for c in text.lower())"],
     ["function countVowels(text) {", "  return (text.match(/[aeiou]/gi) || []).length;", "}"],
     "loop over the letters and count the ones that are vowels"),
    ("length", "returns the length of a string", ["def length(text):", "    return len(text)"],
     ["function length(text) {", "  return text.length;", "}"],
     "use the built-in len function"),
    ("shout", "converts a string to uppercase", ["def shout(text):", "    return text.upper()"],
     ["function shout(text) {", "  return text.toUpperCase();", "}"],
     "call the upper method on the string"),
    ("average", "returns the average of a list of numbers", ["def average(numbers):", "    return sum(numbers) / len(numbers)"],
     ["function average(numbers) {", "  return numbers.reduce((a, b) => a + b, 0) / numbers.length;", "}"],
     "divide the sum of the list by its length"),
    ("factorial", "computes the factorial of n", ["def factorial(n):", "    result = 1", "    for i in range(2, n + 1):", "        result *= i", "    return result"],
     ["function factorial(n) {", "  let result = 1;", "  for (let i = 2; i <= n; i++) result *= i;", "  return result;", "}"],
     "multiply all the whole numbers from one up to n"),
    ("unique", "removes duplicates from a list", ["def unique(items):", "    return list(dict.fromkeys(items))"],
     ["function unique(items) {", "  return [...new Set(items)];", "}"],
     "turn the list into a dictionary and back, which keeps the first copy of each item"),
    ("first", "returns the first element of a list", ["def first(items):", "    return items[0]"],
     ["function first(items) {", "  return items[0];", "}"],
     "index the list at position zero"),
    ("join_words", "joins a list of words with spaces", ["def join_words(words):", "    return ' '.join(words)"],
     ["function joinWords(words) {", "  return words.join(' ');", "}"],
     "call the join method of a space on the list"),
    ("is_palindrome", "checks whether a string is a palindrome", ["def is_palindrome(text):", "    return text == text[::-1]"],
     ["function isPalindrome(text) {", "  return text === text.split('').reverse().join('');", "}"],
     "compare the string with its reverse"),
    ("smallest", "returns the smallest number in a list", ["def smallest(numbers):", "    return min(numbers)"],
     ["function smallest(numbers) {", "  return Math.min(...numbers);", "}"],
     "call the built-in min function on the list"),
    ("count_words", "counts the words in a sentence", ["def count_words(sentence):", "    return len(sentence.split())"],
     ["function countWords(sentence) {", "  return sentence.split(' ').length;", "}"],
     "split the sentence on spaces and count the pieces"),
    ("double_all", "doubles every number in a list", ["def double_all(numbers):", "    return [2 * x for x in numbers]"],
     ["function doubleAll(numbers) {", "  return numbers.map(x => 2 * x);", "}"],
     "build a new list with each number multiplied by two"),
    ("is_empty", "checks whether a list is empty", ["def is_empty(items):", "    return len(items) == 0"],
     ["function isEmpty(items) {", "  return items.length === 0;", "}"],
     "check whether the length of the list is zero"),
    ("last", "returns the last element of a list", ["def last(items):", "    return items[-1]"],
     ["function last(items) {", "  return items[items.length - 1];", "}"],
     "index the list at position minus one"),
    ("cube", "returns the cube of a number", ["def cube(x):", "    return x ** 3"],
     ["function cube(x) {", "  return x ** 3;", "}"],
     "raise the number to the power of three"),
    ("halve", "divides a number by two", ["def halve(x):", "    return x / 2"],
     ["function halve(x) {", "  return x / 2;", "}"],
     "divide the number by two"),
    ("is_positive", "checks whether a number is positive", ["def is_positive(x):", "    return x > 0"],
     ["function isPositive(x) {", "  return x > 0;", "}"],
     "compare the number with zero"),
    ("lower", "converts a string to lowercase", ["def lower(text):", "    return text.lower()"],
     ["function lower(text) {", "  return text.toLowerCase();", "}"],
     "call the lower method on the string"),
    ("count_items", "counts the items in a list", ["def count_items(items):", "    return len(items)"],
     ["function countItems(items) {", "  return items.length;", "}"],
     "take the length of the list"),
    ("add", "adds two numbers", ["def add(a, b):", "    return a + b"],
     ["function add(a, b) {", "  return a + b;", "}"],
     "return the first number plus the second"),
]

# (unit, base unit, factor) for conversions
CONVERSIONS = [
    ("kilometers", "meters", 1000), ("meters", "centimeters", 100), ("hours", "minutes", 60), ("minutes", "seconds", 60),
    ("kilograms", "grams", 1000), ("liters", "milliliters", 1000), ("days", "hours", 24), ("weeks", "days", 7),
    ("feet", "inches", 12), ("yards", "feet", 3), ("dozens", "items", 12), ("centimeters", "millimeters", 10),
    ("years", "months", 12), ("tons", "kilograms", 1000), ("pounds", "ounces", 16), ("gallons", "quarts", 4),
    ("decades", "years", 10), ("centuries", "years", 100), ("pints", "cups", 2), ("hours", "seconds", 3600),
]
ITEMS_FOR_PROBLEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "cards", "eggs", "coins"]


def _split(items: Sequence[Any], heldout: bool) -> list[Any]:
    """Every fifth item is held out for evaluation prompts."""
    return [x for i, x in enumerate(items) if (i % 5 == 4) == heldout]


class Vocab:
    """Draws from the training or the held-out part of every table."""

    def __init__(self, heldout: bool):
        self.heldout = heldout
        self.capitals = _split(CAPITALS, heldout)
        self.elements = _split(ELEMENTS, heldout)
        self.animals = _split(ANIMALS, heldout)
        self.foods = _split(FOODS, heldout)
        self.instruments = _split(INSTRUMENTS, heldout)
        self.sports = _split(SPORTS, heldout)
        self.colours = _split(COLOURS, heldout)
        self.verbs = _split(VERBS, heldout)
        self.names = _split(NAMES, heldout)
        self.roles = _split(ROLE_SUBJECTS, heldout)
        self.reviews = _split(REVIEW_THINGS, heldout)
        self.syn_words = _split(sorted(SYN_ANT), heldout)
        self.rhyme_words = _split(sorted(RHYMES), heldout)
        self.poem_topics = _split(POEM_TOPICS, heldout)
        self.list_topics = _split(LIST_TOPICS, heldout)
        self.processes = _split(PROCESSES, heldout)
        self.code_tasks = _split(CODE_TASKS, heldout)
        self.conversions = _split(CONVERSIONS, heldout)
        self.professions = _split(PROFESSIONS, heldout)
        self.cities = _split(CITIES, heldout)
        # adjectives and small closed classes are shared (they carry the label, not the topic)
        self.pos_adj, self.neg_adj, self.neu_adj = POS_ADJ, NEG_ADJ, NEU_ADJ
        self.problem_items = ITEMS_FOR_PROBLEMS


def pick(rng: random.Random, items: Sequence[Any]) -> Any:
    return items[rng.randrange(len(items))]
