//! FHIR XML read and written independently of the gateway's code path: quick-xml for the
//! syntax and the official R4 JSON Schema (`profiles/fhir-r4/fhir.schema.json`) for what each
//! element is (which repeat, which are primitives of which JSON type), following the FHIR
//! JSON/XML mapping rules. The reference EHR uses it to take XML, and the round-trip tests use
//! it to check that the XML the gateway sent means the same as its JSON.

use std::sync::OnceLock;

use quick_xml::Reader;
use quick_xml::events::{BytesStart, Event};
use serde_json::{Map, Number, Value};

const R4_SCHEMA: &str = include_str!("../../profiles/fhir-r4/fhir.schema.json");

fn definitions() -> &'static Value {
    static DEFINITIONS: OnceLock<Value> = OnceLock::new();
    DEFINITIONS.get_or_init(|| {
        let schema: Value = serde_json::from_str(R4_SCHEMA).unwrap_or_default();
        schema["definitions"].clone()
    })
}

/// One parsed element.
#[derive(Debug)]
struct Node {
    name: String,
    attributes: Vec<(String, String)>,
    children: Vec<Node>,
}

fn parse_tree(xml: &[u8]) -> Result<Node, String> {
    let text = std::str::from_utf8(xml).map_err(|e| format!("not UTF-8: {e}"))?;
    let mut reader = Reader::from_str(text);
    reader.config_mut().trim_text(true);
    let mut stack: Vec<Node> = Vec::new();
    loop {
        match reader.read_event().map_err(|e| format!("not XML: {e}"))? {
            Event::Start(e) => stack.push(node(&e)?),
            Event::Empty(e) => {
                let n = node(&e)?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(n),
                    None => return Ok(n),
                }
            }
            Event::End(_) => {
                let n = stack.pop().ok_or("unbalanced end tag")?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(n),
                    None => return Ok(n),
                }
            }
            Event::Text(t) if t.xml10_content().trim().is_empty() => {}
            Event::Text(_) | Event::CData(_) | Event::GeneralRef(_) => {
                return Err("text content outside xhtml is not FHIR XML".into());
            }
            Event::DocType(_) => return Err("DOCTYPE not allowed".into()),
            Event::Eof => return Err("no document element".into()),
            _ => {}
        }
    }
}

fn node(e: &BytesStart<'_>) -> Result<Node, String> {
    let mut attributes = Vec::new();
    for a in e.attributes() {
        let a = a.map_err(|e| e.to_string())?;
        let key: &str = a.key.as_ref();
        if key == "xmlns" {
            continue;
        }
        let value = a
            .normalized_value(quick_xml::XmlVersion::Implicit1_0)
            .map_err(|e| e.to_string())?;
        attributes.push((key.to_owned(), value.into_owned()));
    }
    Ok(Node {
        name: e.local_name().as_ref().to_owned(),
        attributes,
        children: Vec::new(),
    })
}

/// What a property's schema says an element is.
enum Kind {
    /// A primitive with its JSON type: "string", "number" or "boolean".
    Primitive(&'static str),
    Complex(String),
    /// `ResourceList`: the element holds one resource.
    Resource,
}

fn kind_of(schema: &Value) -> Result<Kind, String> {
    let resolved = match schema["$ref"].as_str() {
        Some(r) => {
            let name = r.trim_start_matches("#/definitions/");
            if name == "ResourceList" {
                return Ok(Kind::Resource);
            }
            let def = &definitions()[name];
            if def.get("properties").is_some() {
                return Ok(Kind::Complex(name.to_owned()));
            }
            def
        }
        None => schema,
    };
    Ok(Kind::Primitive(match resolved["type"].as_str() {
        Some("number") => "number",
        Some("boolean") => "boolean",
        _ => "string",
    }))
}

/// A FHIR XML resource as FHIR JSON. Unknown elements and values that do not fit their type
/// are errors.
pub fn resource_to_json(xml: &[u8]) -> Result<Value, String> {
    resource(&parse_tree(xml)?)
}

fn resource(node: &Node) -> Result<Value, String> {
    let resource_type = node.name.as_str();
    if definitions()[resource_type]["properties"]["resourceType"].is_null() {
        return Err(format!("<{resource_type}> is not a resource"));
    }
    let mut object = Map::new();
    object.insert(
        "resourceType".into(),
        Value::String(resource_type.to_owned()),
    );
    members(node, resource_type, &mut object)?;
    Ok(Value::Object(object))
}

fn members(node: &Node, type_name: &str, object: &mut Map<String, Value>) -> Result<(), String> {
    let properties = &definitions()[type_name]["properties"];
    for (key, value) in &node.attributes {
        // Element ids and extension urls are attributes in XML.
        if key == "id" || key == "url" {
            object.insert(key.clone(), Value::String(value.clone()));
        } else {
            return Err(format!("{type_name}: unexpected attribute {key}"));
        }
    }
    for child in &node.children {
        let name = child.name.as_str();
        let schema = &properties[name];
        if schema.is_null() {
            return Err(format!("{type_name} has no element {name}"));
        }
        let repeated = schema["type"] == "array";
        let item_schema = if repeated { &schema["items"] } else { schema };
        let (value, extra) = match kind_of(item_schema)? {
            Kind::Primitive(json_type) => primitive(child, json_type)?,
            Kind::Complex(t) => {
                let mut inner = Map::new();
                members(child, &t, &mut inner)?;
                (Value::Object(inner), None)
            }
            Kind::Resource => {
                let [only] = child.children.as_slice() else {
                    return Err(format!("{name} must hold exactly one resource"));
                };
                (resource(only)?, None)
            }
        };
        if repeated {
            push(object, name, value);
            if let Some(extra) = extra {
                push(object, &format!("_{name}"), extra);
            }
        } else {
            if object.contains_key(name) {
                return Err(format!("{type_name}.{name} repeats but may not"));
            }
            object.insert(name.to_owned(), value);
            if let Some(extra) = extra {
                object.insert(format!("_{name}"), extra);
            }
        }
    }
    Ok(())
}

fn push(object: &mut Map<String, Value>, key: &str, value: Value) {
    match object
        .entry(key.to_owned())
        .or_insert_with(|| Value::Array(Vec::new()))
    {
        Value::Array(items) => items.push(value),
        other => *other = Value::Array(vec![value]),
    }
}

/// `<x value=".."/>`, with an optional `id` and `extension`s (JSON's `_x`).
fn primitive(node: &Node, json_type: &str) -> Result<(Value, Option<Value>), String> {
    let text = node
        .attributes
        .iter()
        .find(|(k, _)| k == "value")
        .map(|(_, v)| v.as_str());
    let value = match (text, json_type) {
        (None, _) => Value::Null,
        (Some(t), "number") => t
            .parse::<Number>()
            .map(Value::Number)
            .map_err(|_| format!("{}: '{t}' is not a number", node.name))?,
        (Some("true"), "boolean") => Value::Bool(true),
        (Some("false"), "boolean") => Value::Bool(false),
        (Some(t), "boolean") => return Err(format!("{}: '{t}' is not a boolean", node.name)),
        (Some(t), _) => Value::String(t.to_owned()),
    };
    let mut extra = Map::new();
    if let Some((_, id)) = node.attributes.iter().find(|(k, _)| k == "id") {
        extra.insert("id".into(), Value::String(id.clone()));
    }
    for child in &node.children {
        if child.name != "extension" {
            return Err(format!("{}: primitives only take extensions", node.name));
        }
        let mut inner = Map::new();
        members(child, "Extension", &mut inner)?;
        push(&mut extra, "extension", Value::Object(inner));
    }
    Ok((value, (!extra.is_empty()).then_some(Value::Object(extra))))
}

/// FHIR JSON as FHIR XML, elements in the order of the JSON (which must therefore follow the
/// FHIR definition order, as the reference EHR's own answers do).
pub fn json_to_xml(resource: &Value) -> String {
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    write_resource(resource, &mut out);
    out
}

fn write_resource(resource: &Value, out: &mut String) {
    let name = resource["resourceType"].as_str().unwrap_or("Resource");
    out.push_str(&format!("<{name} xmlns=\"http://hl7.org/fhir\">"));
    if let Some(object) = resource.as_object() {
        write_members(object, out);
    }
    out.push_str(&format!("</{name}>"));
}

fn write_members(object: &Map<String, Value>, out: &mut String) {
    for (key, value) in object {
        if key == "resourceType" || key.starts_with('_') {
            continue;
        }
        let items: Vec<&Value> = match value {
            Value::Array(items) => items.iter().collect(),
            other => vec![other],
        };
        for item in items {
            match item {
                Value::Object(inner) if inner.contains_key("resourceType") => {
                    out.push_str(&format!("<{key}>"));
                    write_resource(item, out);
                    out.push_str(&format!("</{key}>"));
                }
                Value::Object(inner) => {
                    out.push_str(&format!("<{key}"));
                    if let Some(url) = inner.get("url").and_then(Value::as_str) {
                        out.push_str(&format!(" url=\"{}\"", quick_xml::escape::escape(url)));
                    }
                    out.push('>');
                    let rest: Map<String, Value> = inner
                        .iter()
                        .filter(|(k, _)| k.as_str() != "url")
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    write_members(&rest, out);
                    out.push_str(&format!("</{key}>"));
                }
                Value::Null => {}
                scalar => {
                    let text = match scalar {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    out.push_str(&format!(
                        "<{key} value=\"{}\"/>",
                        quick_xml::escape::escape(&text)
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fhir_xml_by_the_schema() {
        let xml = br#"<Observation xmlns="http://hl7.org/fhir">
  <meta><profile value="https://x/p"/></meta>
  <identifier><system value="urn:s"/><value value="a:b"/></identifier>
  <status value="final"/>
  <category><coding><code value="procedure"/></coding></category>
  <code><coding><system value="urn:c"/><code value="flow"/></coding><text value="Flow &amp; more"/></code>
  <effectiveDateTime value="2026-11-21T10:15:00Z"/>
  <valueQuantity><value value="4.20"/><unit value="L/min"/></valueQuantity>
  <component><code><text value="x"/></code><valueBoolean value="false"/></component>
  <partOf><identifier><value value="R1"/></identifier></partOf>
</Observation>"#;
        let json = resource_to_json(xml).unwrap();
        assert_eq!(json["meta"]["profile"], serde_json::json!(["https://x/p"]));
        assert!(json["identifier"].is_array() && json["category"].is_array());
        assert_eq!(json["status"], "final");
        assert_eq!(json["valueQuantity"]["value"].to_string(), "4.20");
        assert_eq!(json["component"][0]["valueBoolean"], false);
        assert_eq!(json["code"]["text"], "Flow & more");
        assert!(resource_to_json(b"<Observation><colour value=\"red\"/></Observation>").is_err());
        assert!(
            resource_to_json(
                b"<Observation><valueQuantity><value value=\"x\"/></valueQuantity></Observation>"
            )
            .is_err()
        );
    }

    #[test]
    fn writes_and_reads_back() {
        let bundle: Value = serde_json::from_str(r#"{"resourceType":"Bundle","type":"transaction-response","entry":[{"response":{"status":"201 Created","location":"Observation/1/_history/1"}}]}"#).unwrap();
        let xml = json_to_xml(&bundle);
        assert_eq!(resource_to_json(xml.as_bytes()).unwrap(), bundle);
    }
}
