#!/usr/bin/env python3
"""Writes the ECMO profiles, extension definitions and ValueSets in profiles/fhir/ from the
CodeSystem and the declarations below. Run after changing either; the gateway's tests check that
every resource here is valid R4 and that every emitted resource names a profile defined here."""
import json, pathlib

BASE = "https://fhir.ecmo-gateway.org"
CS = f"{BASE}/CodeSystem/ecmo"
OUT = pathlib.Path(__file__).resolve().parent.parent / "fhir"
codesystem = json.loads((OUT / "CodeSystem-ecmo.json").read_text())
groups = {c["code"]: c for c in codesystem["concept"]}
VERSION = codesystem["version"]
COMMON = {"version": VERSION, "status": "draft", "experimental": False, "date": codesystem["date"],
          "publisher": codesystem["publisher"]}

def write(resource):
    path = OUT / f"{resource['resourceType']}-{resource['id']}.json"
    path.write_text(json.dumps(resource, indent=2, ensure_ascii=False) + "\n")

valuesets = {
    "ecmo-circuit-parameters": ("circuit-parameter", "ECMO circuit parameters", "The measured and set values of an ECMO circuit the gateway writes as Observations."),
    "ecmo-measurement-status": ("measurement-status", "ECMO device measurement status", "Measurement states a device reports with a value."),
    "ecmo-modes": ("ecmo-mode", "ECMO modes", "ECMO configurations (ELSO Maastricht nomenclature)."),
    "ecmo-support-types": ("support-type", "ECMO support types", "Respiratory, cardiac or ECPR support."),
    "ecmo-age-groups": ("age-group", "ECMO age groups", "ELSO Registry age groups at the start of the run."),
    "ecmo-cannula-roles": ("cannula-role", "Cannula roles", "Drainage, return or both."),
    "ecmo-run-activities": ("run-activity", "ECMO run activities", "Parts of a run recorded as child Procedures."),
    "ecmo-discontinuation-reasons": ("discontinuation-reason", "ECMO discontinuation reasons", "Why an ECMO run ended."),
    "ecmo-device-types": ("device-type", "ECMO circuit device types", "The kinds of device on an ECMO circuit the gateway writes a Device for."),
    "ecmo-device-modules": ("device-module", "ECMO device modules", "The parts of a circuit device (HL7 PoCD VMD and channel) its metrics hang under."),
}
for vs_id, (group, title, description) in valuesets.items():
    codes = [{"code": c["code"], "display": c["display"]} for c in groups[group]["concept"]]
    write({"resourceType": "ValueSet", "id": vs_id, "url": f"{BASE}/ValueSet/{vs_id}", **COMMON,
           "name": "".join(w.capitalize() for w in vs_id.split("-")), "title": title, "description": description,
           "compose": {"include": [{"system": CS, "concept": codes}]}})

# Statuses the gateway writes an Observation with: final, amended after a device's correction,
# entered-in-error when a reading is retracted (codes of FHIR's own observation-status).
write({"resourceType": "ValueSet", "id": "ecmo-observation-status", "url": f"{BASE}/ValueSet/ecmo-observation-status", **COMMON,
       "name": "EcmoObservationStatus", "title": "ECMO Observation status",
       "description": "The statuses of a circuit Observation: final, amended once the device corrected the value, entered-in-error once it was retracted.",
       "compose": {"include": [{"system": "http://hl7.org/fhir/observation-status",
                                "concept": [{"code": "final", "display": "Final"}, {"code": "amended", "display": "Amended"},
                                            {"code": "entered-in-error", "display": "Entered in Error"}]}]}})

def element(element_id, **rules):
    path = rules.pop("path", element_id)
    return {"id": element_id, "path": path, **rules}

def structure(sd_id, title, base_type, description, elements, kind="resource", context=None):
    sd = {"resourceType": "StructureDefinition", "id": sd_id, "url": f"{BASE}/StructureDefinition/{sd_id}", **COMMON,
          "name": "".join(w.capitalize() for w in sd_id.split("-")), "title": title, "description": description,
          "fhirVersion": "4.0.1", "kind": kind, "abstract": False, "type": base_type,
          "baseDefinition": f"http://hl7.org/fhir/StructureDefinition/{base_type}", "derivation": "constraint",
          "differential": {"element": elements}}
    if context:
        sd["context"] = [{"type": "element", "expression": c} for c in context]
    write(sd)

# What a charting destination makes of an interval's readings (codes of FHIR's own
# observation-statistics, as Observation/$stats uses them).
write({"resourceType": "ValueSet", "id": "ecmo-interval-statistics", "url": f"{BASE}/ValueSet/ecmo-interval-statistics", **COMMON,
       "name": "EcmoIntervalStatistics", "title": "ECMO charting interval statistics",
       "description": "The statistic an interval's Observation charts of the interval's readings at a destination that charts per interval: their mean, minimum or maximum.",
       "compose": {"include": [{"system": "http://terminology.hl7.org/CodeSystem/observation-statistics",
                                "concept": [{"code": "average", "display": "Average"}, {"code": "minimum", "display": "Minimum"},
                                            {"code": "maximum", "display": "Maximum"}]}]}})

def extension(ext_id, title, description, context, value_type, binding=None):
    value = {"id": f"Extension.value[x]", "path": "Extension.value[x]", "min": 1, "type": [{"code": value_type}]}
    if binding:
        value["binding"] = {"strength": "required", "valueSet": f"{BASE}/ValueSet/{binding}"}
    structure(ext_id, title, "Extension", description, [
        element("Extension", short=title, definition=description),
        element("Extension.url", fixedUri=f"{BASE}/StructureDefinition/{ext_id}"),
        value,
    ], kind="complex-type", context=context)

extension("ecmo-support-type", "ECMO support type", "Why ECMO supports the patient (ELSO splits runs by it).", ["Procedure"], "CodeableConcept", "ecmo-support-types")
extension("ecmo-age-group", "ECMO age group", "The patient's ELSO age group at the start of the run.", ["Procedure"], "CodeableConcept", "ecmo-age-groups")
extension("cannula-role", "Cannula role", "What the cannula at this body site does in the circuit.", ["Procedure.bodySite"], "CodeableConcept", "ecmo-cannula-roles")
extension("laterality", "Laterality", "Side of the body site (SNOMED CT 7771000 left, 24028007 right); R4 cannot post-coordinate it in the site's coding.", ["Procedure.bodySite"], "CodeableConcept")
extension("device-use-period", "Device use period", "When the device was attached to the patient's circuit (R5 DeviceAssociation.period); its readings in this period belong to the run.", ["Procedure.usedReference"], "Period")
extension("complication-time", "Complication time", "When the complication occurred (ELSO records a time for every complication).", ["Procedure.complication"], "dateTime")

def ext_slice(path, name, ext_id, min_=0):
    return element(f"{path}:{name}", path=path, sliceName=name, min=min_, max="1",
                   type=[{"code": "Extension", "profile": [f"{BASE}/StructureDefinition/{ext_id}"]}])

structure("ecmo-circuit-observation", "ECMO circuit Observation", "Observation",
    "A value measured or set on an ECMO circuit, written by the gateway from a device reading.", [
    element("Observation", constraint=[{"key": "ecmo-obs-1", "severity": "error",
            "human": "A reading has a value or says why it has none", "expression": "value.exists() or dataAbsentReason.exists()",
            "source": f"{BASE}/StructureDefinition/ecmo-circuit-observation"}]),
    element("Observation.identifier", min=1, max="1", short="device family : serial : parameter : device time (UTC)"),
    element("Observation.identifier.system", min=1, fixedUri=f"{BASE}/sid/observation"),
    element("Observation.identifier.value", min=1),
    element("Observation.status", binding={"strength": "required", "valueSet": f"{BASE}/ValueSet/ecmo-observation-status"},
            short="final; amended once the device corrected the value (the earlier version stays in the EHR's history)"),
    element("Observation.category", min=2, max="2"),
    element("Observation.code", binding={"strength": "required", "valueSet": f"{BASE}/ValueSet/ecmo-circuit-parameters"},
            short="Our circuit-parameter code first; SNOMED CT / LOINC / MDC codings where they match"),
    element("Observation.subject", type=[{"code": "Reference", "targetProfile": ["http://hl7.org/fhir/StructureDefinition/Patient"]}]),
    element("Observation.partOf", max="1", type=[{"code": "Reference", "targetProfile": [f"{BASE}/StructureDefinition/ecmo-run-procedure"]}]),
    element("Observation.effective[x]", min=1, type=[{"code": "dateTime"}, {"code": "Period"}],
            short="The device's own timestamp; the interval, for a statistic of a charting interval"),
    element("Observation.value[x]", type=[{"code": "Quantity"}, {"code": "boolean"}, {"code": "SampledData"}],
            short="The value; a waveform (samples every period ms from effectiveDateTime) as SampledData"),
    element("Observation.interpretation", binding={"strength": "extensible", "valueSet": f"{BASE}/ValueSet/ecmo-measurement-status"}),
    element("Observation.method", binding={"strength": "required", "valueSet": f"{BASE}/ValueSet/ecmo-interval-statistics"},
            short="For a charting interval's Observation: the statistic of the interval's readings it charts"),
    element("Observation.device", min=1, short="The device's metric for this parameter (HL7 PoCD): its category tells a setting from a measurement",
            type=[{"code": "Reference", "targetProfile": [f"{BASE}/StructureDefinition/ecmo-device-metric"]}]),
])

structure("ecmo-run-procedure", "ECMO run", "Procedure",
    "One patient's course on ECMO, from the start of blood flow to the removal of the last cannula (ELSO, ECLS-CDM).", [
    element("Procedure"),
    element("Procedure.extension", slicing={"discriminator": [{"type": "value", "path": "url"}], "rules": "open"}),
    ext_slice("Procedure.extension", "supportType", "ecmo-support-type"),
    ext_slice("Procedure.extension", "ageGroup", "ecmo-age-group"),
    element("Procedure.identifier", min=1, max="1"),
    element("Procedure.identifier.system", min=1, fixedUri=f"{BASE}/sid/ecmo-run"),
    element("Procedure.identifier.value", min=1, short="The run id"),
    element("Procedure.partOf", max="0"),
    element("Procedure.category", min=1, patternCodeableConcept={"coding": [{"system": "http://snomed.info/sct", "code": "182744004"}]}),
    element("Procedure.code", min=1, patternCodeableConcept={"coding": [{"system": "http://snomed.info/sct", "code": "233573008"}]}),
    element("Procedure.subject", type=[{"code": "Reference", "targetProfile": ["http://hl7.org/fhir/StructureDefinition/Patient"]}]),
    element("Procedure.performed[x]", type=[{"code": "Period"}]),
    element("Procedure.outcome", binding={"strength": "required", "valueSet": f"{BASE}/ValueSet/ecmo-discontinuation-reasons"}),
    element("Procedure.statusReason", binding={"strength": "required", "valueSet": f"{BASE}/ValueSet/ecmo-discontinuation-reasons"}),
    element("Procedure.bodySite.extension", slicing={"discriminator": [{"type": "value", "path": "url"}], "rules": "open"}),
    ext_slice("Procedure.bodySite.extension", "role", "cannula-role", 1),
    ext_slice("Procedure.bodySite.extension", "laterality", "laterality"),
    element("Procedure.complication.extension", slicing={"discriminator": [{"type": "value", "path": "url"}], "rules": "open"}),
    ext_slice("Procedure.complication.extension", "time", "complication-time", 1),
    element("Procedure.focalDevice.manipulated", type=[{"code": "Reference", "targetProfile": [f"{BASE}/StructureDefinition/ecmo-console-device"]}]),
    element("Procedure.usedReference", short="Other devices of the circuit (monitors, ...), one entry per period attached",
            type=[{"code": "Reference", "targetProfile": [f"{BASE}/StructureDefinition/ecmo-console-device"]}]),
    element("Procedure.usedReference.extension", slicing={"discriminator": [{"type": "value", "path": "url"}], "rules": "open"}),
    ext_slice("Procedure.usedReference.extension", "period", "device-use-period", 1),
])

structure("ecmo-run-activity-procedure", "ECMO run activity", "Procedure",
    "A part of an ECMO run: a period in one mode, a circuit change, or a weaning trial.", [
    element("Procedure"),
    element("Procedure.identifier", min=1, max="1"),
    element("Procedure.identifier.system", min=1, fixedUri=f"{BASE}/sid/ecmo-run"),
    element("Procedure.identifier.value", min=1, short="<run id>/<key>"),
    element("Procedure.partOf", min=1, max="1", type=[{"code": "Reference", "targetProfile": [f"{BASE}/StructureDefinition/ecmo-run-procedure"]}]),
    element("Procedure.category", min=1, binding={"strength": "required", "valueSet": f"{BASE}/ValueSet/ecmo-run-activities"}),
    element("Procedure.code", min=1),
    element("Procedure.performed[x]", min=1, type=[{"code": "Period"}]),
])

structure("ecmo-console-device", "ECMO circuit device", "Device",
    "A device of an ECMO circuit (the console, an in-line monitor), identified by the manufacturer's serial number.", [
    element("Device"),
    element("Device.identifier", min=1, max="2", short="The serial number first; then the IEEE EUI-64 where known (as the HL7 PoCD IG identifies an MDS)"),
    element("Device.identifier.system", min=1, short=f"{BASE}/sid/device-serial/<manufacturer>, or urn:oid:1.2.840.10004.1.1.1.0.0.1.0.0.1.2680 (EUI-64)"),
    element("Device.identifier.value", min=1),
    element("Device.manufacturer", min=1),
    element("Device.serialNumber", min=1),
    element("Device.modelNumber", min=1),
    element("Device.type", min=1, binding={"strength": "required", "valueSet": f"{BASE}/ValueSet/ecmo-device-types"}),
])
structure("ecmo-device-component", "ECMO device module or channel", "Device",
    "A part of a circuit device between the device and its metrics, as the HL7 Point-of-Care Device IG draws the containment tree: a module (VMD) whose parent is the device (MDS), and its channel whose parent is the module. The patient is the device's, never the part's.", [
    element("Device"),
    element("Device.identifier", min=1, max="1"),
    element("Device.identifier.system", min=1, short=f"{BASE}/sid/device-component/<manufacturer>"),
    element("Device.identifier.value", min=1, short="<serial>:<module> for the module, <serial>:<module>/1 for its channel"),
    element("Device.type", min=1, binding={"strength": "required", "valueSet": f"{BASE}/ValueSet/ecmo-device-modules"}),
    element("Device.patient", max="0"),
    element("Device.parent", min=1, type=[{"code": "Reference", "targetProfile": [
        f"{BASE}/StructureDefinition/ecmo-console-device", f"{BASE}/StructureDefinition/ecmo-device-component"]}],
        short="The module's device (MDS), or the channel's module (VMD)"),
])
structure("ecmo-device-metric", "ECMO device metric", "DeviceMetric",
    "One parameter of one circuit device, as the HL7 Point-of-Care Device IG draws it: whether the device measures, sets or calculates the value (category), its unit, the device (source) and the channel of the device's module it belongs to (parent). Observations point at it.", [
    element("DeviceMetric"),
    element("DeviceMetric.identifier", min=1, max="1"),
    element("DeviceMetric.identifier.system", min=1, short=f"{BASE}/sid/device-metric/<manufacturer>"),
    element("DeviceMetric.identifier.value", min=1, short="<serial>:<parameter code>"),
    element("DeviceMetric.type", binding={"strength": "required", "valueSet": f"{BASE}/ValueSet/ecmo-circuit-parameters"},
            short="Our circuit-parameter code first; SNOMED CT / LOINC / MDC codings where they match"),
    element("DeviceMetric.source", min=1, type=[{"code": "Reference", "targetProfile": [f"{BASE}/StructureDefinition/ecmo-console-device"]}]),
    element("DeviceMetric.parent", min=1, type=[{"code": "Reference", "targetProfile": [f"{BASE}/StructureDefinition/ecmo-device-component"]}],
            short="The channel of the module that measures or sets the parameter (the CodeSystem's module property)"),
    element("DeviceMetric.category", short="measurement, setting or calculation, as the CodeSystem's metric-category property or the device's table says"),
])
print("written to", OUT)
