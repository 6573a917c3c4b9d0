"""Seeded synthetic clinical notes for three hospitals, as instruction/response records.

Nothing here is real patient data. Notes are built from templates with varied ages, vitals, findings and
medications, and every response is a *rule* applied to the note (the condition follows from its findings,
the flagged vitals from fixed thresholds, the follow-up interval from the condition and the vitals), so a
model has real structure to learn and a validation loss that can genuinely fall.

The federation is deliberately non-IID and unequal in size, so example-count weighting matters:

* ``hospital-a`` is a cardiology centre, ``hospital-b`` an oncology centre, ``hospital-c`` a children's
  hospital; 70 % of each site's notes come from its own specialty, 15 % from each of the others;
* each site writes its notes in its own house style (template mix);
* training sets hold 240 / 160 / 120 records.

``general_corpus`` gives plain clinical prose from all specialties (no instruction format) to pre-train the
offline base model and its tokenizer: the model learns the language, not the tasks.

Usage: ``python -m hospital_fedlora_tools.synthetic_notes --out workspace/data [--seed 0]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hospital_fedlora.atomic_folder import replace_folder

SITES = ("hospital-a", "hospital-b", "hospital-c")
SPLITS = ("train", "validation", "test")

# Records per split; different sizes on purpose (weighted FedAvg must weigh hospital-a most).
SPLIT_SIZES: dict[str, dict[str, int]] = {
    "hospital-a": {"train": 240, "validation": 48, "test": 48},
    "hospital-b": {"train": 160, "validation": 32, "test": 32},
    "hospital-c": {"train": 120, "validation": 24, "test": 24},
}
SITE_SPECIALTY = {"hospital-a": "cardiology", "hospital-b": "oncology", "hospital-c": "paediatrics"}
OWN_SPECIALTY_SHARE = 0.7
# House style: how often each site writes a note in template 0 / 1 / 2.
SITE_TEMPLATE_WEIGHTS = {"hospital-a": (6, 3, 1), "hospital-b": (2, 6, 2), "hospital-c": (2, 2, 6)}

TASK_SUMMARY = "Summarize the clinical note."
TASK_DISCHARGE = "Write discharge instructions."
TASK_GROUP = "Assign the diagnosis group."
TASK_VITALS = "Flag the abnormal vital signs."
TASKS = (TASK_SUMMARY, TASK_DISCHARGE, TASK_GROUP, TASK_VITALS)


@dataclass(frozen=True)
class Condition:
    name: str
    specialty: str
    complaints: tuple[str, ...]
    findings: tuple[str, ...]  # unique to this condition, so the note determines the diagnosis
    medications: tuple[str, ...]
    advice: str
    warning: str
    clinic: str
    follow_up_weeks: int
    # Ranges vitals are drawn from; some cross the flagging thresholds on purpose.
    hr: tuple[int, int] = (60, 100)
    sbp: tuple[int, int] = (105, 150)
    temp: tuple[float, float] = (36.4, 37.6)
    spo2: tuple[int, int] = (94, 99)


CONDITIONS: tuple[Condition, ...] = (
    # --- cardiology
    Condition(
        "heart failure", "cardiology",
        ("breathlessness on exertion", "swollen ankles", "breathlessness lying flat"),
        ("bibasal crackles and pitting ankle oedema", "raised JVP and a third heart sound",
         "BNP 1450 and cardiomegaly on chest X-ray"),
        ("furosemide 40 mg daily", "bisoprolol 2.5 mg daily", "ramipril 2.5 mg daily"),
        "Weigh yourself every morning and limit fluids to 1.5 litres a day",
        "weight rises by 2 kg in three days or breathing worsens", "heart failure", 2,
        hr=(70, 118), sbp=(95, 165), spo2=(88, 98),
    ),
    Condition(
        "atrial fibrillation", "cardiology",
        ("palpitations", "dizziness and palpitations", "tiredness and palpitations"),
        ("irregularly irregular pulse", "ECG with absent P waves and irregular QRS complexes",
         "pulse deficit at the apex"),
        ("apixaban 5 mg twice daily", "metoprolol 25 mg twice daily", "edoxaban 60 mg daily"),
        "Take the anticoagulant at the same times every day and do not stop it on your own",
        "you have black stools, fainting or sudden weakness", "arrhythmia", 4,
        hr=(80, 150), sbp=(100, 160),
    ),
    Condition(
        "myocardial infarction", "cardiology",
        ("central chest pain", "crushing chest pain and sweating", "chest pain radiating to the left arm"),
        ("troponin rising with ST elevation in V2 to V4", "troponin rising with ST depression in V5 and V6",
         "new Q waves and a rising troponin"),
        ("aspirin 75 mg daily", "ticagrelor 90 mg twice daily", "atorvastatin 80 mg at night"),
        "Avoid heavy lifting for six weeks and join cardiac rehabilitation",
        "chest pain returns or lasts more than 15 minutes", "cardiology", 1,
        hr=(55, 115), sbp=(85, 170), spo2=(90, 99),
    ),
    Condition(
        "hypertension", "cardiology",
        ("headaches", "a routine blood pressure check", "blurred vision and headaches"),
        ("left ventricular hypertrophy on ECG", "home readings above 150 over 95",
         "hypertensive changes in the retina"),
        ("amlodipine 5 mg daily", "ramipril 5 mg daily", "indapamide 2.5 mg daily"),
        "Cut down on salt and check your blood pressure at home twice a week",
        "you have a severe headache, chest pain or weakness", "hypertension", 6,
        hr=(60, 95), sbp=(145, 195),
    ),
    # --- oncology
    Condition(
        "breast cancer", "oncology",
        ("a lump in the left breast", "a lump in the right breast", "fatigue during hormone therapy"),
        ("hard irregular breast mass with a palpable axillary node", "biopsy showing invasive ductal carcinoma",
         "oestrogen receptor positive tumour on biopsy"),
        ("tamoxifen 20 mg daily", "letrozole 2.5 mg daily", "anastrozole 1 mg daily"),
        "Keep taking the hormone tablet every day and report any new lumps",
        "you notice leg swelling, chest pain or bone pain", "breast oncology", 6,
        hr=(60, 100), sbp=(105, 150),
    ),
    Condition(
        "lung cancer", "oncology",
        ("a persistent cough", "coughing up blood", "weight loss and a cough"),
        ("right hilar mass on CT with mediastinal nodes", "biopsy showing non-small cell carcinoma",
         "left upper lobe mass with pleural effusion"),
        ("pembrolizumab 200 mg every three weeks", "carboplatin every three weeks",
         "dexamethasone 4 mg daily"),
        "Keep a diary of side effects and stop smoking completely",
        "you cough up more blood or become very breathless", "thoracic oncology", 3,
        hr=(65, 115), sbp=(100, 150), spo2=(87, 97),
    ),
    Condition(
        "colorectal cancer", "oncology",
        ("a change in bowel habit", "rectal bleeding", "tiredness and weight loss"),
        ("sigmoid tumour on colonoscopy", "iron deficiency anaemia with a caecal mass on CT",
         "rising CEA after bowel resection"),
        ("capecitabine 1000 mg twice daily", "oxaliplatin every two weeks", "ferrous sulfate 200 mg daily"),
        "Drink plenty of fluids and use moisturiser on your hands and feet",
        "you have more than four loose stools a day or a fever", "colorectal oncology", 2,
        hr=(65, 110), sbp=(95, 150), temp=(36.4, 38.4),
    ),
    Condition(
        "febrile neutropenia", "oncology",
        ("fever after chemotherapy", "shivering after chemotherapy", "fever and feeling unwell"),
        ("neutrophil count 0.3 after chemotherapy", "neutrophil count 0.1 with no clear source",
         "low neutrophils and rigors ten days after chemotherapy"),
        ("piperacillin tazobactam 4.5 g every 8 hours", "meropenem 1 g every 8 hours",
         "filgrastim 30 MU daily"),
        "Check your temperature twice a day and avoid people with infections",
        "your temperature is 38 C or higher", "haematology oncology", 1,
        hr=(85, 130), sbp=(80, 130), temp=(37.8, 39.6),
    ),
    # --- paediatrics
    Condition(
        "bronchiolitis", "paediatrics",
        ("cough and poor feeding", "fast breathing and a runny nose", "wheeze and poor feeding"),
        ("fine crackles and subcostal recession", "nasal flaring and widespread wheeze in an infant",
         "RSV positive nasal swab"),
        ("nasal saline drops before feeds", "small frequent feeds", "paracetamol 15 mg per kg every 6 hours"),
        "Offer smaller feeds more often and keep the nose clear",
        "your child stops feeding, has pauses in breathing or turns blue", "general paediatrics", 1,
        hr=(110, 180), sbp=(70, 100), temp=(36.8, 38.6), spo2=(88, 98),
    ),
    Condition(
        "asthma exacerbation", "paediatrics",
        ("wheeze and cough at night", "shortness of breath after a cold", "chest tightness and wheeze"),
        ("widespread expiratory wheeze", "peak flow at 50 percent of predicted",
         "prolonged expiration with a silent chest on the left"),
        ("salbutamol 6 puffs every 4 hours", "prednisolone 1 mg per kg daily for 3 days",
         "beclometasone 100 mcg twice daily"),
        "Use the spacer with every puff and follow the written asthma plan",
        "the reliever lasts less than four hours or your child cannot talk in sentences",
        "paediatric respiratory", 2,
        hr=(90, 170), sbp=(85, 115), spo2=(89, 98),
    ),
    Condition(
        "gastroenteritis", "paediatrics",
        ("vomiting and diarrhoea", "loose stools and vomiting", "diarrhoea and reduced wet nappies"),
        ("dry mucous membranes and reduced skin turgor", "sunken eyes with a soft abdomen",
         "rotavirus positive stool sample"),
        ("oral rehydration solution 5 ml per kg every hour", "ondansetron 0.15 mg per kg once",
         "zinc 10 mg daily for 10 days"),
        "Give small sips of fluid often and wash hands after nappy changes",
        "your child has no wet nappy for 12 hours or blood in the stool", "general paediatrics", 1,
        hr=(100, 175), sbp=(70, 105), temp=(36.8, 38.8),
    ),
    Condition(
        "otitis media", "paediatrics",
        ("ear pain and fever", "pulling at the ear", "ear pain and poor sleep"),
        ("bulging red tympanic membrane", "discharge from the ear canal with a perforated drum",
         "opaque tympanic membrane with an air fluid level"),
        ("amoxicillin 40 mg per kg per day in two doses", "ibuprofen 10 mg per kg every 8 hours",
         "paracetamol 15 mg per kg every 6 hours"),
        "Finish the whole course and keep water out of the ear",
        "your child has swelling behind the ear or a stiff neck", "ear nose and throat", 3,
        hr=(90, 165), sbp=(80, 110), temp=(37.0, 39.2),
    ),
)
SPECIALTY_NAMES = {"cardiology": "Cardiology", "oncology": "Oncology", "paediatrics": "Paediatrics"}
_BY_SPECIALTY = {s: tuple(c for c in CONDITIONS if c.specialty == s) for s in SPECIALTY_NAMES}

_HISTORY = {
    "cardiology": ("type 2 diabetes", "a previous stroke", "chronic kidney disease", "no past history"),
    "oncology": ("a previous smoking history", "hypothyroidism", "type 2 diabetes", "no past history"),
    "paediatrics": ("eczema", "prematurity", "no past history", "a recent cold"),
}
_SETTINGS = ("the emergency department", "clinic", "the ward", "the day unit")


# ------------------------------------------------------------------------------------------ one patient
@dataclass(frozen=True)
class Patient:
    condition: Condition
    age: int  # years; months when ``infant``
    infant: bool
    female: bool
    history: str
    complaint: str
    finding: str
    medication: str
    setting: str
    weight: int
    hr: int
    sbp: int
    dbp: int
    temp: float
    spo2: int

    @property
    def child(self) -> bool:
        return self.condition.specialty == "paediatrics" or self.infant

    @property
    def age_text(self) -> str:
        return f"{self.age}-month-old" if self.infant else f"{self.age}-year-old"

    @property
    def person(self) -> str:
        if self.child:
            return "girl" if self.female else "boy"
        return "woman" if self.female else "man"


def _weight(rng: random.Random, cond: Condition, age: int, infant: bool) -> int:
    if infant:
        return 4 + age // 2 + rng.randint(0, 2)
    if cond.specialty == "paediatrics":
        return 8 + 3 * age + rng.randint(-2, 6)
    return rng.randint(48, 110)


def _draw_patient(rng: random.Random, cond: Condition) -> Patient:
    infant = cond.specialty == "paediatrics" and rng.random() < 0.4
    if infant:
        age = rng.randint(2, 11)
    elif cond.specialty == "paediatrics":
        age = rng.randint(1, 15)
    else:
        age = rng.randint(32, 91)
    sbp = rng.randint(*cond.sbp)
    return Patient(
        condition=cond,
        age=age,
        infant=infant,
        female=(cond.name == "breast cancer") or rng.random() < 0.5,
        history=rng.choice(_HISTORY[cond.specialty]),
        complaint=rng.choice(cond.complaints),
        finding=rng.choice(cond.findings),
        medication=rng.choice(cond.medications),
        setting=rng.choice(_SETTINGS),
        weight=_weight(rng, cond, age, infant),
        hr=rng.randint(*cond.hr),
        sbp=sbp,
        dbp=max(40, sbp - rng.randint(30, 60)),
        temp=round(rng.uniform(*cond.temp), 1),
        spo2=rng.randint(*cond.spo2),
    )


def abnormal_vitals(p: Patient) -> list[str]:
    """Flags by fixed thresholds; children have their own heart-rate and blood-pressure limits."""
    flags = []
    hr_high = 160 if p.infant else (140 if p.child else 100)
    if p.hr > hr_high:
        flags.append(f"tachycardia (HR {p.hr})")
    if p.child:
        if p.sbp < 75:
            flags.append(f"hypotension (BP {p.sbp}/{p.dbp})")
    else:
        if p.sbp < 90:
            flags.append(f"hypotension (BP {p.sbp}/{p.dbp})")
        elif p.sbp >= 160:
            flags.append(f"high blood pressure (BP {p.sbp}/{p.dbp})")
    if p.temp >= 38.0:
        flags.append(f"fever (T {p.temp} C)")
    if p.spo2 < 92:
        flags.append(f"low oxygen saturation (SpO2 {p.spo2}%)")
    return flags


def render_note(p: Patient, template: int) -> str:
    sex_short = "F" if p.female else "M"
    age_short = f"{p.age}m" if p.infant else f"{p.age}y"
    weight = f" Weight {p.weight} kg." if p.child else ""
    if template == 0:
        return (
            f"{p.age_text} {p.person} with {p.history}, presenting with {p.complaint}.{weight} "
            f"HR {p.hr}, BP {p.sbp}/{p.dbp}, T {p.temp} C, SpO2 {p.spo2}%. "
            f"Exam: {p.finding}. Plan: {p.medication}."
        )
    if template == 1:
        return (
            f"Seen in {p.setting}. {p.age_text} {p.person}, {p.complaint}. Background of {p.history}.{weight} "
            f"Observations: pulse {p.hr}, blood pressure {p.sbp}/{p.dbp}, temperature {p.temp} C, "
            f"saturations {p.spo2}%. Findings: {p.finding}. Started on {p.medication}."
        )
    return (
        f"Pt {age_short} {sex_short}. PMH {p.history}. C/O {p.complaint}.{weight} "
        f"Obs HR {p.hr} BP {p.sbp}/{p.dbp} T {p.temp} SpO2 {p.spo2}. O/E {p.finding}. Rx {p.medication}."
    )


def follow_up_weeks(p: Patient) -> int:
    # Anyone sent home with an abnormal vital sign is reviewed within a week.
    return 1 if abnormal_vitals(p) else p.condition.follow_up_weeks


def respond(p: Patient, task: str) -> str:
    c = p.condition
    flags = abnormal_vitals(p)
    if task == TASK_SUMMARY:
        vitals = "; ".join(flags) if flags else "vital signs stable"
        return f"{p.age_text} {p.person} with {c.name}; {vitals}; started {p.medication}."
    if task == TASK_DISCHARGE:
        verb = "Give your child" if p.child else "Take"
        weeks = follow_up_weeks(p)
        return (
            f"{verb} {p.medication}. {c.advice}. Come back at once if {c.warning}. "
            f"Follow-up in the {c.clinic} clinic in {weeks} week{'s' if weeks > 1 else ''}."
        )
    if task == TASK_GROUP:
        return f"{SPECIALTY_NAMES[c.specialty]}: {c.name}"
    if task == TASK_VITALS:
        return ("Abnormal: " + "; ".join(flags) + ".") if flags else "None; all vital signs within normal limits."
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


# --------------------------------------------------------------------------------------------- records
def _rng(seed: int, *labels: str) -> random.Random:
    # A stable digest (not hash(), which is salted per process) keeps files byte-identical across runs.
    digest = hashlib.sha256(":".join([str(seed), *labels]).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _pick_condition(rng: random.Random, specialty: str | None) -> Condition:
    if specialty is None:
        return rng.choice(CONDITIONS)
    if rng.random() < OWN_SPECIALTY_SHARE:
        return rng.choice(_BY_SPECIALTY[specialty])
    others = [s for s in _BY_SPECIALTY if s != specialty]
    return rng.choice(_BY_SPECIALTY[rng.choice(others)])


def generate_site_records(site: str, n: int, seed: int) -> list[dict]:
    """``n`` instruction records for ``site``: dicts with ``instruction``, ``input`` (the note), ``response``.

    Each record also carries ``specialty`` and ``condition`` (ground truth, for analysis; loaders ignore them).
    """
    if site not in SITE_SPECIALTY:
        raise ValueError(f"unknown site {site!r}; expected one of {SITES}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = _rng(seed, "site", site)
    weights = SITE_TEMPLATE_WEIGHTS[site]
    records = []
    for _ in range(n):
        patient = _draw_patient(rng, _pick_condition(rng, SITE_SPECIALTY[site]))
        template = rng.choices(range(3), weights=weights)[0]
        task = rng.choice(TASKS)
        records.append(
            {
                "instruction": task,
                "input": render_note(patient, template),
                "response": respond(patient, task),
                "specialty": patient.condition.specialty,
                "condition": patient.condition.name,
            }
        )
    return records


_KNOWLEDGE = (
    "{Name} is common in {clinic} practice. Patients often report {complaint}. Typical findings include {finding}.",
    "In {name}, treatment may include {medication}. Clinicians also look for {finding}.",
    "Patients with {name} are usually followed in the {clinic} clinic. Safety advice: {advice_lower}.",
    "{Name} belongs to {Specialty}. Patients should come back at once if {warning}.",
)


_GENERAL = (
    "A heart rate above 100 beats per minute in an adult is tachycardia; in children the limit depends on age.",
    "Infants normally have a heart rate up to 160 and older children up to 140.",
    "A temperature of 38 C or higher is a fever.",
    "Oxygen saturation below 92% is low and needs review by a doctor.",
    "A systolic blood pressure below 90 is hypotension, and 160 or above is high blood pressure.",
    "Vital signs include pulse, blood pressure, temperature, respiratory rate and oxygen saturation.",
    "Before discharge, patients receive written advice, a medication list and a follow-up appointment.",
    "Nurses record observations every four hours and escalate abnormal values.",
    "Medication doses for children are usually calculated per kilogram of body weight.",
    "The discharge letter lists the diagnosis, the medicines started and the plan for follow-up.",
    "Safety-netting advice tells families when to come back to hospital.",
    "Each specialty keeps its own clinic: cardiology, oncology and paediatrics among them.",
    "Cardiology treats the heart, Oncology treats cancer and Paediatrics cares for children.",
    "Take medicines exactly as prescribed and bring the list to every appointment.",
    "Give your child the medicine with food unless the leaflet says otherwise.",
    "Come back at once if symptoms get worse or new symptoms appear.",
    "Follow-up in the clinic is usually booked for a few weeks after discharge.",
    "Abnormal results are repeated and reported to the team the same day.",
    "Observations are written as HR (heart rate), BP (blood pressure), T (temperature) and SpO2 (saturations).",
    "A summary of the admission gives the age, the diagnosis, any abnormal signs and the treatment started.",
    "Low oxygen saturation, fever, hypotension and tachycardia are common reasons to review a patient.",
    "None of the warning signs were present, and the vital signs were within normal limits.",
)


def general_corpus(n_docs: int, seed: int = 0) -> list[str]:
    """Plain clinical prose from every specialty (notes and short knowledge paragraphs, no instructions).

    Used to pre-train the base model and its tokenizer; drawn from its own random stream, so it never
    repeats the hospitals' records.
    """
    rng = _rng(seed, "general-corpus")
    docs = []
    for _ in range(n_docs):
        cond = rng.choice(CONDITIONS)
        kind = rng.random()
        if kind < 0.7:
            docs.append(render_note(_draw_patient(rng, cond), rng.randrange(3)))
        elif kind < 0.8:
            docs.append(" ".join(rng.sample(_GENERAL, 3)))
        else:
            docs.append(
                rng.choice(_KNOWLEDGE).format(
                    Name=cond.name[0].upper() + cond.name[1:],
                    name=cond.name,
                    clinic=cond.clinic,
                    complaint=rng.choice(cond.complaints),
                    finding=rng.choice(cond.findings),
                    medication=rng.choice(cond.medications),
                    advice_lower=cond.advice[0].lower() + cond.advice[1:],
                    Specialty=SPECIALTY_NAMES[cond.specialty],
                    warning=cond.warning,
                )
            )
    return docs


# --------------------------------------------------------------------------------------------- writing
def _jsonl_bytes(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode("utf-8")


def write_federation_data(out_dir: Path, seed: int = 0) -> dict[str, dict[str, Path]]:
    """Write ``<out>/<site>/{train,validation,test}.jsonl`` for every site; returns the paths.

    Files for a seed are byte-identical on every run. The folder is replaced atomically, so a reader never
    sees a half-written federation.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for site in SITES:
            sizes = SPLIT_SIZES[site]
            records = generate_site_records(site, sum(sizes.values()), seed)
            (staging / site).mkdir()
            start = 0
            for split in SPLITS:
                chunk = records[start : start + sizes[split]]
                start += sizes[split]
                (staging / site / f"{split}.jsonl").write_bytes(_jsonl_bytes(chunk))
        staging.chmod(0o755)  # mkdtemp makes it private
        replace_folder(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {site: {split: out_dir / site / f"{split}.jsonl" for split in SPLITS} for site in SITES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hospital_fedlora_tools.synthetic_notes", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write <site>/<split>.jsonl into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = write_federation_data(args.out, seed=args.seed)
    for site, splits in paths.items():
        sizes = ", ".join(f"{split} {SPLIT_SIZES[site][split]}" for split in splits)
        print(f"{site} ({SITE_SPECIALTY[site]}): {sizes} -> {args.out / site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
