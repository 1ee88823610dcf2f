#!/usr/bin/env python3
"""Writes profiles/pocd/: the differentials of the HL7 Point-of-Care Device IG's profiles that
the gateway's resources are checked against (mappings' tests, `pocd_conformance`), converted
from the IG source's XML to FHIR JSON. The IG's package is not reachable from here, so the
StructureDefinitions come from its source repository:

    python3 profiles/tools/extract_pocd.py <checkout of github.com/HL7/uv-pocd>

Only what a differential says is kept (ids, paths, slices, cardinality, types and their
profiles, bindings, constraints, fixed and pattern values); the IG's own text is not."""
import json, pathlib, subprocess, sys
import xml.etree.ElementTree as ET

NS = {"f": "http://hl7.org/fhir"}
PROFILES = ["MdsDevice", "VmdDevice", "ChannelDevice", "NumericDeviceMetric",
            "NumericObservation", "SampleArrayObservation"]
OUT = pathlib.Path(__file__).resolve().parent.parent / "pocd"

def value(node, tag):
    found = node.find(f"f:{tag}", NS)
    return None if found is None else found.get("value")

def element(e):
    out = {"id": e.get("id"), "path": value(e, "path")}
    for tag in ["sliceName", "min", "max"]:
        v = value(e, tag)
        if v is not None:
            out[tag] = int(v) if tag == "min" else v
    types = []
    for t in e.findall("f:type", NS):
        entry = {"code": value(t, "code")}
        for key in ["profile", "targetProfile"]:
            urls = [p.get("value") for p in t.findall(f"f:{key}", NS)]
            if urls:
                entry[key] = urls
        types.append(entry)
    if types:
        out["type"] = types
    b = e.find("f:binding", NS)
    if b is not None:
        out["binding"] = {k: value(b, k) for k in ["strength", "valueSet"] if value(b, k)}
    constraints = [{k: value(c, k) for k in ["key", "severity", "human", "expression"] if value(c, k)}
                   for c in e.findall("f:constraint", NS)]
    if constraints:
        out["constraint"] = constraints
    for child in e:
        tag = child.tag.split("}")[1]
        if tag.startswith("fixed") or tag.startswith("pattern"):
            if child.get("value") is None:
                sys.exit(f"{out['id']}: {tag} with a complex value is not converted")
            out[tag] = child.get("value")
    return out

def main(repo):
    head = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    OUT.mkdir(exist_ok=True)
    for name in PROFILES:
        path = pathlib.Path(repo) / "input" / "resources" / f"StructureDefinition-{name}.xml"
        root = ET.fromstring(path.read_text(encoding="utf-8-sig"))
        sd = {"resourceType": "StructureDefinition", "id": name, "url": value(root, "url"),
              "name": value(root, "name"), "status": value(root, "status"), "fhirVersion": value(root, "fhirVersion"),
              "kind": value(root, "kind"), "abstract": value(root, "abstract") == "true", "type": value(root, "type"),
              "baseDefinition": value(root, "baseDefinition"), "derivation": value(root, "derivation"),
              "differential": {"element": [element(e) for e in root.find("f:differential", NS).findall("f:element", NS)]}}
        (OUT / f"StructureDefinition-{name}.json").write_text(json.dumps(sd, indent=2) + "\n")
    (OUT / "SOURCE").write_text(f"https://github.com/HL7/uv-pocd at {head}, input/resources/ (HL7 FHIR license)\n")
    print("written to", OUT, "from", head)

if __name__ == "__main__":
    main(sys.argv[1])
