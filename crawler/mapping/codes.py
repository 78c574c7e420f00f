"""Code systems and code tables the DICOM → FHIR mapping needs.

Pure data and small pure functions; the SOP Class names and modality meanings are tables taken
from pydicom's dictionaries (``dictionary.py``, written by tools/make_dictionary.py).

Sources:

* Body Part Examined → SNOMED CT: DICOM PS3.16 Annex L (Table L-1 "Anatomic Region Codes and
  Body Part Examined Defined Terms", Table L-2 for large animals), current edition. Rows whose
  Body Part Examined is blank are not keys; rows with no SNOMED CT code (the FETAL* terms, which
  have no code, and DISTALPHALANX, coded in UMLS) are left out, so :func:`body_part` returns
  ``None`` for them. The meaning is the Annex L Code Meaning, which is sometimes not the SNOMED
  CT preferred term (e.g. ``CHEST`` and ``THORAX`` → 816094009 "Chest"). JAW appears in Annex L
  on the Mandible row and on the Jaw region row; it maps to the Jaw region (MANDIBLE has its own
  term).
* Coding scheme designators: PS3.16 Section 8, Table 8-1 "Coding Schemes" (designators and
  coding scheme UIDs). Where HL7 (the FHIR core terminology list or HL7 Terminology, THO) gives
  a canonical URI for the scheme, that is used; otherwise the scheme's UID as ``urn:oid:``.
* Laterality: CID 244 "Laterality".
* Modality: PS3.3 C.7.3.1.1.1 Defined Terms and Retired Defined Terms; display from CID 29/32/33.
* SOP Class names: PS3.6 Annex A, from pydicom's UID dictionary.
"""

from __future__ import annotations

from functools import lru_cache

from .dictionary import MODALITY_DISPLAYS, SOP_CLASS_NAMES

DCM = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
RADLEX = "http://radlex.org"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
SOP_CLASS_SYSTEM = "urn:ietf:rfc:3986"
ENDPOINT_CONNECTION_TYPE = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
DATA_ABSENT_REASON = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"

PERFORMER: tuple[str, str] = ("PRF", "performer")
SECONDARY_PERFORMER: tuple[str, str] = ("SPRF", "secondary performer")

UNKNOWN_SCHEME_PREFIX = "urn:dicom:scheme:"

BODY_PART: dict[str, tuple[str, str]] = {
    "3RDVENTRICLE": ("49841001", "Third ventricle"),
    "4THVENTRICLE": ("35918002", "Fourth ventricle"),
    "ABDOMEN": ("818981001", "Abdomen"),
    "ABDOMENPELVIS": ("818982008", "Abdomen and Pelvis"),
    "ABDOMINALAORTA": ("7832008", "Abdominal aorta"),
    "ACA": ("60176003", "Anterior cerebral artery"),
    "ACJOINT": ("85856004", "Acromioclavicular joint"),
    "ADRENAL": ("23451007", "Adrenal gland"),
    "AMNIOTICFLUID": ("77012006", "Amniotic fluid"),
    "ANKLE": ("70258002", "Ankle joint"),
    "ANTCARDIACV": ("194996006", "Anterior cardiac vein"),
    "ANTCOMMA": ("8012006", "Anterior communicating artery"),
    "ANTECUBITALV": ("128553008", "Antecubital vein"),
    "ANTSPINALA": ("17388009", "Anterior spinal artery"),
    "ANTTIBIALA": ("68053000", "Anterior tibial artery"),
    "ANUSRECTUMSIGMD": ("110612005", "Anus, rectum and sigmoid colon"),
    "AORTA": ("15825003", "Aorta"),
    "AORTICARCH": ("57034009", "Aortic arch"),
    "APPENDIX": ("66754008", "Appendix"),
    "ARTERY": ("51114001", "Artery"),
    "ASCAORTA": ("54247002", "Ascending aorta"),
    "ASCENDINGCOLON": ("9040008", "Ascending colon"),
    "ATLANTOAXIAL": ("62555009", "Atlantal-axial joint"),
    "ATLANTOOCCIPITAL": ("20292002", "Atlanto-occipital joint"),
    "AXILLA": ("91470000", "Axilla"),
    "AXILLARYA": ("67937003", "Axillary Artery"),
    "AXILLARYV": ("68705008", "Axillary vein"),
    "AZYGOSVEIN": ("72107004", "Azygos vein"),
    "BACK": ("77568009", "Back"),
    "BASILARA": ("59011009", "Basilar artery"),
    "BILEDUCT": ("28273000", "Bile duct"),
    "BILIARYTRACT": ("34707002", "Biliary tract"),
    "BLADDER": ("89837001", "Bladder"),
    "BLADDERURETHRA": ("110837003", "Bladder and urethra"),
    "BRACHIALA": ("17137000", "Brachial artery"),
    "BRACHIALV": ("20115005", "Brachial vein"),
    "BRAIN": ("12738006", "Brain"),
    "BREAST": ("76752008", "Breast"),
    "BRONCHUS": ("955009", "Bronchus"),
    "BULB": ("21479005", "Carotid bulb"),
    "BUTTOCK": ("46862004", "Buttock"),
    "CALCANEUS": ("80144004", "Calcaneus"),
    "CALF": ("53840002", "Calf of leg"),
    "CARDIOVASCSYS": ("113257007", "Cardiovascular system"),
    "CAROTID": ("69105007", "Carotid Artery"),
    "CARPUS": ("8205005", "Carpus"),
    "CCA": ("32062004", "Common carotid artery"),
    "CELIACA": ("57850000", "Celiac artery"),
    "CEPHALICV": ("20699002", "Cephalic vein"),
    "CEREBELLUM": ("113305005", "Cerebellum"),
    "CEREBHEMISPHERE": ("372073000", "Cerebral hemisphere"),
    "CEREBRALA": ("88556005", "Cerebral artery"),
    "CERVIX": ("71252005", "Cervix"),
    "CFA": ("181347005", "Common femoral artery"),
    "CFV": ("397363009", "Common femoral vein"),
    "CHEEK": ("60819002", "Cheek"),
    "CHEST": ("816094009", "Chest"),
    "CHESTABDOMEN": ("416550000", "Chest and Abdomen"),
    "CHESTABDPELVIS": ("416775004", "Chest, Abdomen and Pelvis"),
    "CHOROIDPLEXUS": ("80621003", "Choroid plexus"),
    "CIRCLEOFWILLIS": ("11279006", "Circle of Willis"),
    "CLAVICLE": ("51299004", "Clavicle"),
    "COCCYX": ("64688005", "Coccyx"),
    "COLON": ("71854001", "Colon"),
    "COMILIACA": ("73634005", "Common iliac artery"),
    "COMILIACV": ("46027005", "Common iliac vein"),
    "COMMONBILEDUCT": ("79741001", "Common bile duct"),
    "CORNEA": ("28726007", "Cornea"),
    "CORONARYARTERY": ("41801008", "Coronary artery"),
    "CORONARYSINUS": ("90219004", "Coronary sinus"),
    "CSPINE": ("122494005", "Cervical spine"),
    "CTSPINE": ("1217257000", "Cervico-thoracic spine"),
    "CULDESAC": ("53843000", "Rectouterine pouch"),
    "DESCAORTA": ("281130003", "Descending aorta"),
    "DESCENDINGCOLON": ("32622004", "Descending colon"),
    "DIGIT": ("82680008", "Digit"),
    "DUODENUM": ("38848004", "Duodenum"),
    "EAC": ("84301002", "External auditory canal"),
    "EAR": ("117590005", "Ear"),
    "ECA": ("22286001", "External carotid artery"),
    "ELBOW": ("16953009", "Elbow joint"),
    "ENDOARTERIAL": ("51114001", "Endo-arterial"),
    "ENDOCARDIAC": ("80891009", "Endo-cardiac"),
    "ENDOESOPHAGEAL": ("32849002", "Endo-esophageal"),
    "ENDOMETRIUM": ("2739003", "Endometrium"),
    "ENDONASAL": ("53342003", "Endo-nasal"),
    "ENDONASOPHARYNYX": ("18962004", "Endo-nasopharyngeal"),
    "ENDORECTAL": ("34402009", "Endo-rectal"),
    "ENDORENAL": ("64033007", "Endo-renal"),
    "ENDOURETERIC": ("87953007", "Endo-ureteric"),
    "ENDOURETHRAL": ("13648007", "Endo-urethral"),
    "ENDOVAGINAL": ("76784001", "Endo-vaginal"),
    "ENDOVASCULAR": ("59820001", "Endo-vascular"),
    "ENDOVENOUS": ("29092000", "Endo-venous"),
    "ENDOVESICAL": ("48367006", "Endo-vesical"),
    "EPIDIDYMIS": ("87644002", "Epididymis"),
    "EPIGASTRIC": ("27947004", "Epigastric region"),
    "ESOPHAGUS": ("32849002", "Esophagus"),
    "EXTILIACA": ("113269004", "External iliac artery"),
    "EXTILIACV": ("63507001", "External iliac vein"),
    "EXTJUGV": ("71585003", "External jugular vein"),
    "EXTREMITY": ("66019005", "Extremity"),
    "EYE": ("81745001", "Eye"),
    "EYELID": ("80243003", "Eyelid"),
    "FACE": ("89545001", "Face"),
    "FACIALA": ("23074001", "Facial artery"),
    "FEMORALA": ("7657000", "Femoral artery"),
    "FEMORALV": ("83419000", "Femoral vein"),
    "FEMUR": ("71341001", "Femur"),
    "FIBULA": ("87342007", "Fibula"),
    "FINGER": ("7569003", "Finger"),
    "FLANK": ("58602004", "Flank"),
    "FONTANEL": ("79361005", "Fontanel of skull"),
    "FOOT": ("56459004", "Foot"),
    "FOREARM": ("14975008", "Forearm"),
    "FOREFETLOCK": ("13190002", "Fetlock of forelimb"),
    "FOREFOOT": ("419176008", "Forefoot"),
    "FORENAVICULAR": ("30518006", "Navicular of forefoot"),
    "FOREPASTERN": ("31329001", "Pastern of forefoot"),
    "FRONTALSINUS": ("55060009", "Frontal sinus"),
    "GALLBLADDER": ("28231008", "Gallbladder"),
    "GASTRICV": ("110568007", "Gastric vein"),
    "GENICULARA": ("128559007", "Genicular artery"),
    "GESTSAC": ("300571009", "Gestational sac"),
    "GLUTEAL": ("46862004", "Gluteal region"),
    "GSV": ("60734001", "Great saphenous vein"),
    "HAND": ("85562004", "Hand"),
    "HEAD": ("69536005", "Head"),
    "HEADNECK": ("774007", "Head and Neck"),
    "HEART": ("80891009", "Heart"),
    "HEPATICA": ("76015000", "Hepatic artery"),
    "HEPATICV": ("8993003", "Hepatic vein"),
    "HINDFETLOCK": ("113351006", "Fetlock of hindlimb"),
    "HINDFOOT": ("416804009", "Hindfoot"),
    "HINDNAVICULAR": ("75772009", "Navicular of hindfoot"),
    "HINDPASTERN": ("18525008", "Pastern of hindfoot"),
    "HIP": ("24136001", "Hip joint"),
    "HUMERUS": ("85050009", "Humerus"),
    "HYPOGASTRIC": ("11708003", "Hypogastric region"),
    "HYPOPHARYNX": ("81502006", "Hypopharynx"),
    "IAC": ("361078006", "Internal Auditory Canal"),
    "ICA": ("86117002", "Internal carotid artery"),
    "ILEUM": ("34516001", "Ileum"),
    "ILIACA": ("10293006", "Iliac artery"),
    "ILIACV": ("244411005", "Iliac vein"),
    "ILIUM": ("22356005", "Ilium"),
    "INFMESA": ("33795007", "Inferior mesenteric artery"),
    "INFVENACAVA": ("64131007", "Inferior vena cava"),
    "INGUINAL": ("26893007", "Inguinal region"),
    "INNOMINATEA": ("12691009", "Innominate artery"),
    "INNOMINATEV": ("8887007", "Innominate vein"),
    "INTILIACA": ("90024005", "Internal iliac artery"),
    "INTJUGULARV": ("12123001", "Internal jugular vein"),
    "INTMAMMARYA": ("69327007", "Internal mammary artery"),
    "INTRACRANIAL": ("1101003", "Intracranial"),
    "JAW": ("661005", "Jaw region"),
    "JEJUNUM": ("21306003", "Jejunum"),
    "JOINT": ("39352004", "Joint"),
    "KIDNEY": ("64033007", "Kidney"),
    "KNEE": ("72696002", "Knee"),
    "LACRIMALA": ("59749000", "Lacrimal artery"),
    "LARGEINTESTINE": ("14742008", "Large intestine"),
    "LARYNX": ("4596009", "Larynx"),
    "LATRIUM": ("82471001", "Left atrium"),
    "LATVENTRICLE": ("66720007", "Lateral Ventricle"),
    "LEGS": ("42694008", "All legs"),
    "LFEMORALA": ("113270003", "Left femoral artery"),
    "LHEPATICV": ("273202007", "Left hepatic vein"),
    "LHYPOCHONDRIAC": ("133945003", "Left hypochondriac region"),
    "LINGUALA": ("113264009", "Lingual artery"),
    "LINGUINAL": ("85119005", "Left inguinal region"),
    "LIVER": ("10200004", "Liver"),
    "LLQ": ("68505006", "Left lower quadrant of abdomen"),
    "LLUMBAR": ("1017210004", "Left lumbar region"),
    "LOWERLEG": ("30021000", "Lower leg"),
    "LOWERLIMB": ("61685007", "Lower limb"),
    "LOWERTRUNK": ("63337009", "Lower trunk"),
    "LPORTALV": ("70253006", "Left portal vein"),
    "LPULMONARYA": ("50408007", "Left pulmonary artery"),
    "LSPINE": ("122496007", "Lumbar spine"),
    "LSSPINE": ("1217253001", "Lumbo-sacral spine"),
    "LSUPPULMONARYV": ("43863001", "Superior left pulmonary vein"),
    "LUMBAR": ("52612000", "Lumbar region"),
    "LUMBARA": ("34635009", "Lumbar artery"),
    "LUMEN": ("91747007", "Lumen of blood vessel"),
    "LUNG": ("39607008", "Lung"),
    "LUQ": ("86367003", "Left upper quadrant of abdomen"),
    "LVENTRICLE": ("87878005", "Left ventricle"),
    "MANDIBLE": ("91609006", "Mandible"),
    "MASTOID": ("59066005", "Mastoid bone"),
    "MAXILLA": ("70925003", "Maxilla"),
    "MCA": ("17232002", "Middle cerebral artery"),
    "MEDIASTINUM": ("72410000", "Mediastinum"),
    "MESENTRICA": ("86570000", "Mesenteric artery"),
    "MESENTRICV": ("128583004", "Mesenteric vein"),
    "METACARPUS": ("36455000", "Metacarpus"),
    "METATARSUS": ("280711000", "Metatarsus"),
    "MIDHEPATICV": ("273099000", "Middle hepatic vein"),
    "MORISONSPOUCH": ("243977002", "Morisons pouch"),
    "MOUTH": ("123851003", "Mouth"),
    "NASOPHARYNX": ("360955006", "Nasopharynx"),
    "NECK": ("45048000", "Neck"),
    "NECKCHEST": ("417437006", "Neck and Chest"),
    "NECKCHESTABDOMEN": ("416152001", "Neck, Chest and Abdomen"),
    "NECKCHESTABDPELV": ("416319003", "Neck, Chest, Abdomen and Pelvis"),
    "NOSE": ("45206002", "Nose"),
    "OCCIPTALV": ("32114007", "Occipital vein"),
    "OCCPITALA": ("31145008", "Occipital artery"),
    "OPHTHALMICA": ("53549008", "Ophthalmic artery"),
    "OPTICCANAL": ("55024004", "Optic canal"),
    "ORBIT": ("363654007", "Orbital structure"),
    "OVARY": ("15497006", "Ovary"),
    "PANCBILEDUCT": ("110621006", "Pancreatic duct and bile duct systems"),
    "PANCREAS": ("15776009", "Pancreas"),
    "PANCREATICDUCT": ("69930009", "Pancreatic duct"),
    "PARASTERNAL": ("91691001", "Parasternal"),
    "PARATHYROID": ("111002", "Parathyroid"),
    "PAROTID": ("45289007", "Parotid gland"),
    "PATELLA": ("64234005", "Patella"),
    "PCA": ("70382005", "Posterior cerebral artery"),
    "PELVIS": ("816092008", "Pelvis"),
    "PELVISLOWEXTREMT": ("1231522001", "Pelvis and lower extremities"),
    "PENILEA": ("282044005", "Penile artery"),
    "PENIS": ("18911002", "Penis"),
    "PERINEUM": ("38864007", "Perineum"),
    "PERONEALA": ("8821006", "Peroneal artery"),
    "PHANTOM": ("706342009", "Phantom"),
    "PHARYNX": ("54066008", "Pharynx"),
    "PHARYNXLARYNX": ("312535008", "Pharynx and larynx"),
    "PLACENTA": ("78067005", "Placenta"),
    "POPLITEALA": ("43899006", "Popliteal artery"),
    "POPLITEALFOSSA": ("32361000", "Popliteal fossa"),
    "POPLITEALV": ("56849005", "Popliteal vein"),
    "PORTALV": ("32764006", "Portal vein"),
    "POSCOMMA": ("43119007", "Posterior communicating artery"),
    "POSTIBIALA": ("13363002", "Posterior tibial artery"),
    "PROFFEMA": ("31677005", "Profunda femoris artery"),
    "PROFFEMV": ("23438002", "Profunda femoris vein"),
    "PROSTATE": ("41216001", "Prostate"),
    "PULMONARYA": ("81040000", "Pulmonary artery"),
    "PULMONARYV": ("122972007", "Pulmonary vein"),
    "RADIALA": ("45631007", "Radial artery"),
    "RADIUS": ("62413002", "Radius"),
    "RADIUSULNA": ("110535000", "Radius and ulna"),
    "RATRIUM": ("73829009", "Right atrium"),
    "RECTUM": ("34402009", "Rectum"),
    "RENALA": ("2841007", "Renal artery"),
    "RENALV": ("56400007", "Renal vein"),
    "RETROPERITONEUM": ("82849001", "Retroperitoneum"),
    "RFEMORALA": ("69833005", "Right femoral artery"),
    "RHEPATICV": ("272998002", "Right hepatic vein"),
    "RHYPOCHONDRIAC": ("133946002", "Right hypochondriac region"),
    "RIB": ("113197003", "Rib"),
    "RINGUINAL": ("37117007", "Right inguinal region"),
    "RLQ": ("48544008", "Right lower quadrant of abdomen"),
    "RLUMBAR": ("1017211000", "Right lumbar region"),
    "RPORTALV": ("73931004", "Right portal vein"),
    "RPULMONARYA": ("78480002", "Right pulmonary artery"),
    "RSUPPULMONARYV": ("8629005", "Superior right pulmonary vein"),
    "RUQ": ("50519007", "Right upper quadrant of abdomen"),
    "RVENTRICLE": ("53085002", "Right ventricle"),
    "SAPHENOUSV": ("362072009", "Saphenous vein"),
    "SCALP": ("41695006", "Scalp"),
    "SCAPULA": ("79601000", "Scapula"),
    "SCJOINT": ("7844006", "Sternoclavicular joint"),
    "SCLERA": ("18619003", "Sclera"),
    "SCROTUM": ("20233005", "Scrotum"),
    "SELLA": ("42575006", "Sella turcica"),
    "SEMVESICLE": ("64739004", "Seminal vesicle"),
    "SESAMOID": ("58742003", "Sesamoid bones of foot"),
    "SFA": ("181349008", "Superficial femoral artery"),
    "SFJ": ("128587003", "Saphenofemoral junction"),
    "SFV": ("397364003", "Superficial femoral vein"),
    "SHOULDER": ("16982005", "Shoulder"),
    "SIGMOID": ("60184004", "Sigmoid colon"),
    "SIJOINT": ("39723000", "Sacroiliac joint"),
    "SKULL": ("89546000", "Skull"),
    "SMA": ("42258001", "Superior mesenteric artery"),
    "SMALLINTESTINE": ("30315005", "Small intestine"),
    "SPINALCORD": ("2748008", "Spinal cord"),
    "SPINE": ("421060004", "Spine"),
    "SPLEEN": ("78961009", "Spleen"),
    "SPLENICA": ("22083002", "Splenic artery"),
    "SPLENICV": ("35819009", "Splenic vein"),
    "SSPINE": ("54735007", "Sacrum"),
    "STERNUM": ("56873002", "Sternum"),
    "STIFLE": ("116010006", "Stiffle"),
    "STOMACH": ("69695003", "Stomach"),
    "SUBCLAVIANA": ("36765005", "Subclavian artery"),
    "SUBCLAVIANV": ("9454009", "Subclavian vein"),
    "SUBCOSTAL": ("19695001", "Subcostal"),
    "SUBMANDIBULAR": ("54019009", "Submandibular gland"),
    "SUPRACLAVICULAR": ("77621008", "Supraclavicular region of neck"),
    "SUPRAPUBIC": ("11708003", "Suprapubic region"),
    "SUPTHYROIDA": ("72021004", "Superior thyroid artery"),
    "SVC": ("48345005", "Superior vena cava"),
    "TAIL": ("18149002", "Coccygeal vertrebrae"),
    "TARSUS": ("108371006", "Tarsus"),
    "TESTIS": ("40689003", "Testis"),
    "THALAMUS": ("42695009", "Thalamus"),
    "THIGH": ("68367000", "Thigh"),
    "THORACICAORTA": ("113262008", "Thoracic aorta"),
    "THORAX": ("816094009", "Chest"),
    "THUMB": ("76505004", "Thumb"),
    "THYMUS": ("9875009", "Thymus"),
    "THYROID": ("69748006", "Thyroid"),
    "TIBIA": ("12611008", "Tibia"),
    "TIBIAFIBULA": ("110536004", "Tibia and fibula"),
    "TLSPINE": ("1217256009", "Thoraco-lumbar spine"),
    "TMJ": ("53620006", "Temporomandibular joint"),
    "TOE": ("29707007", "Toe"),
    "TONGUE": ("21974007", "Tongue"),
    "TRACHEA": ("44567001", "Trachea"),
    "TRACHEABRONCHUS": ("110726009", "Trachea and bronchus"),
    "TRANSVERSECOLON": ("485005", "Transverse colon"),
    "TRUNK": ("22943007", "Trunk"),
    "TSPINE": ("122495006", "Thoracic spine"),
    "UGITRACT": ("62834003", "Upper gastro-intestinal tract"),
    "ULNA": ("23416004", "Ulna"),
    "ULNARA": ("44984001", "Ulnar artery"),
    "UMBILICAL": ("90290004", "Umbilical region"),
    "UMBILICALA": ("50536004", "Umbilical artery"),
    "UMBILICALV": ("284639000", "Umbilical vein"),
    "UPPERARM": ("40983000", "Upper arm"),
    "UPPERLIMB": ("53120007", "Upper limb"),
    "UPPERTRUNK": ("67734004", "Upper trunk"),
    "UPRURINARYTRACT": ("431491007", "Upper urinary tract"),
    "URETER": ("87953007", "Ureter"),
    "URETHRA": ("13648007", "Urethra"),
    "URINARYTRACT": ("431938005", "Urinary tract"),
    "UTERUS": ("35039007", "Uterus"),
    "VAGINA": ("76784001", "Vagina"),
    "VEIN": ("29092000", "Vein"),
    "VERTEBRALA": ("85234005", "Vertebral artery"),
    "VULVA": ("45292006", "Vulva"),
    "WHOLEBODY": ("38266002", "Entire body"),
    "WING": ("53036007", "Wing"),
    "WRIST": ("74670003", "Wrist joint"),
    "ZYGOMA": ("13881006", "Zygoma"),
}
"""Body Part Examined (0018,0015) defined term → (SNOMED CT code, Annex L Code Meaning)."""


@lru_cache(maxsize=1024)
def body_part(value: str) -> tuple[str, str] | None:
    """The SNOMED CT code and meaning for a Body Part Examined value, or ``None`` if Annex L has none."""
    return BODY_PART.get(value.strip().upper())


LATERALITY: dict[str, tuple[str, str]] = {
    "R": ("24028007", "Right"),
    "L": ("7771000", "Left"),
    "B": ("51440002", "Bilateral"),
    "U": ("66459002", "Unilateral"),
}
"""(Image) Laterality enumerated value → SNOMED CT code and its CID 244 meaning.

51440002 is "Right and left" as SNOMED CT's fully specified name; CID 244 gives "Bilateral".
"""

SCHEME_SYSTEMS: dict[str, str] = {
    "99SDM": "urn:oid:2.16.840.1.113883.6.53",
    "ACR": "urn:oid:2.16.840.1.113883.6.76",
    "ASTM-sigpurpose": "urn:oid:1.2.840.10065.1.12",
    "C4": "http://www.ama-assn.org/go/cpt",
    "C5": "urn:oid:2.16.840.1.113883.6.82",
    "caDSR": "urn:oid:2.16.840.1.113883.3.26.2",
    "CD2": "urn:oid:2.16.840.1.113883.6.13",
    "CTV3": "urn:oid:2.16.840.1.113883.6.6",
    "DC": "urn:oid:1.2.840.10008.2.16.10",
    "DCM": DCM,
    "DCMUID": "urn:oid:1.2.840.10008.2.6.1",
    "FMA": "urn:oid:2.16.840.1.113883.6.119",
    "HPC": "urn:oid:2.16.840.1.113883.6.14",
    "I10": "http://hl7.org/fhir/sid/icd-10",
    "I10C": "http://hl7.org/fhir/sid/icd-10-cm",
    "I10P": "http://www.cms.gov/Medicare/Coding/ICD10",
    "I11": "urn:oid:1.2.840.10008.2.16.16",
    "I9": "urn:oid:2.16.840.1.113883.6.42",
    "I9C": "http://hl7.org/fhir/sid/icd-9-cm",
    "IBSI": "urn:oid:1.2.840.10008.2.16.13",
    "ICDO3": "http://terminology.hl7.org/CodeSystem/icd-o-3",
    "ISO3166_1": "urn:iso:std:iso:3166",
    "ISO639_1": "urn:oid:2.16.840.1.113883.6.99",
    "ISO639_2": "urn:oid:2.16.840.1.113883.6.100",
    "ITIS_TSN": "urn:oid:1.2.840.10008.2.16.7",
    "LN": LOINC,
    "MA": "urn:oid:1.2.840.10008.2.16.5",
    "MAYONRISBSASRG": "urn:oid:1.2.840.10008.2.16.12",
    "MDC": "urn:iso:std:iso:11073:10101",
    "MGI": "urn:oid:1.2.840.10008.2.16.8",
    "MSH": "http://terminology.hl7.org/CodeSystem/MSH",
    "NCIt": "http://ncicb.nci.nih.gov/xml/owl/EVS/Thesaurus.owl",
    "NDC": "http://hl7.org/fhir/sid/ndc",
    "NEU": "urn:oid:2.16.840.1.113883.6.210",
    "NICIP": "urn:oid:2.16.840.1.113883.2.1.3.2.4.21",
    "NYUMCCG": "urn:oid:1.2.840.10008.2.16.11",
    "PATHLEX": "urn:oid:1.3.6.1.4.1.19376.1.8.2.1",
    "POS": "urn:oid:2.16.840.1.113883.6.50",
    "PUBCHEM_CID": "urn:oid:1.2.840.10008.2.16.9",
    "RADELEMENT": "urn:oid:1.2.840.10008.2.16.15",
    "RADLEX": RADLEX,
    "RFC3066": "urn:oid:2.16.840.1.113883.6.121",
    "RFC5646": "urn:ietf:bcp:47",
    "RO": "urn:oid:1.2.840.10008.2.16.14",
    "RRID": "urn:oid:1.2.840.10008.2.16.18",
    "RXNORM": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "SCT": SNOMED,
    "SNM3": "urn:oid:2.16.840.1.113883.6.51",
    "SRT": SNOMED,
    "UBERON": "urn:oid:1.2.840.10008.2.16.6",
    "UCUM": UCUM,
    "UMLS": "urn:oid:2.16.840.1.113883.6.86",
    "UNS": "urn:oid:1.2.840.10008.2.16.17",
    "UPC": "urn:oid:2.16.840.1.113883.6.55",
}
"""Coding Scheme Designator (0008,0102) → FHIR ``Coding.system``.

RadLex Playbook procedure codes (``RPID...``) are part of RadLex and use the RADLEX designator
in DICOM, so they share its system. SRT is the retired designator for SNOMED codes; it maps to
SNOMED CT because it names the same terminology, but a legacy SNOMED-RT style code value (such
as ``T-D3000``) is not a SNOMED CT concept id and needs translating before it is valid there.
Schemes listed without a UID (BARI, BI, ...) have no system to give and fall to the default.
"""

_SCHEME_SYSTEMS_FOLDED = {key.upper(): value for key, value in SCHEME_SYSTEMS.items()}


@lru_cache(maxsize=1024)
def scheme_system(designator: str, version: str | None = None) -> str:
    """The FHIR code system URI for a DICOM Coding Scheme Designator.

    Designators are matched exactly first, then without regard to case. An unknown designator
    is kept rather than dropped, as ``urn:dicom:scheme:<designator>``. ``version`` (Coding
    Scheme Version (0008,0103)) is accepted so callers can pass what they have; no scheme in
    Table 8-1 changes its URI with the version, so it belongs in ``Coding.version`` instead.
    """
    del version
    key = designator.strip()
    if not key:
        raise ValueError("empty coding scheme designator")
    found = SCHEME_SYSTEMS.get(key) or _SCHEME_SYSTEMS_FOLDED.get(key.upper())
    return found if found is not None else UNKNOWN_SCHEME_PREFIX + key


def sop_class_name(uid: str) -> str | None:
    """The PS3.6 name of a SOP Class UID (e.g. "CT Image Storage"), or ``None`` if not one."""
    return SOP_CLASS_NAMES.get(uid.strip())


RETIRED_MODALITIES: frozenset[str] = frozenset(
    {"AS", "CD", "CF", "CP", "CS", "DD", "DF", "DM", "DS", "EC", "FA", "FS", "LP", "MA", "MS", "OPR", "ST", "VF"}
)
"""Modality Retired Defined Terms of PS3.3 C.7.3.1.1.1; older studies still carry them."""

MODALITIES: frozenset[str] = RETIRED_MODALITIES | frozenset(
    {
        "ANN", "AR", "ASMT", "AU", "BDUS", "BI", "BMD", "CFM", "CR", "CT", "CTPROTOCOL", "DG",
        "DMS", "DOC", "DX", "ECG", "EEG", "EMG", "EOG", "EPS", "ES", "FID", "GM", "HC", "HD",
        "IO", "IOL", "IVOCT", "IVUS", "KER", "KO", "LEN", "LS", "M3D", "MG", "MR", "NM", "OAM",
        "OCT", "OP", "OPM", "OPT", "OPTBSV", "OPTENF", "OPV", "OSS", "OT", "PA", "PLAN", "POS",
        "PR", "PT", "PX", "REG", "RESP", "RF", "RG", "RTDOSE", "RTIMAGE", "RTINTENT", "RTPLAN",
        "RTRAD", "RTRECORD", "RTSEGANN", "RTSTRUCT", "RWV", "SEG", "SM", "SMR", "SR", "SRF",
        "STAIN", "TEXTUREMAP", "TG", "US", "VA", "XA", "XAPROTOCOL", "XC",
    }
)  # fmt: skip
"""Modality (0008,0060) Defined Terms of PS3.3 C.7.3.1.1.1, the retired ones included."""

def modality_display(code: str) -> str | None:
    """The DICOM code meaning of a modality (e.g. CT → "Computed Tomography"), if one is known."""
    return MODALITY_DISPLAYS.get(code.strip().upper())
