//! The suite's reports: JUnit XML for CI servers and a short Markdown summary for people.

use std::fmt::Write as _;
use std::io;

use quick_xml::Writer;
use quick_xml::events::{BytesDecl, BytesText, Event};

use super::runner::{ScenarioResult, Verdict};

/// Totals over all steps of all scenarios.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
}

impl Totals {
    pub fn of(results: &[ScenarioResult]) -> Self {
        let mut t = Self::default();
        for step in results.iter().flat_map(|r| &r.steps) {
            match step.verdict {
                Verdict::Passed => t.passed += 1,
                Verdict::Failed(_) => t.failed += 1,
                Verdict::Skipped(_) => t.skipped += 1,
            }
        }
        t
    }
}

/// One `<testsuite>` per scenario, one `<testcase>` per step.
pub fn junit_xml(results: &[ScenarioResult]) -> io::Result<Vec<u8>> {
    let totals = Totals::of(results);
    let seconds: f64 = results.iter().map(|r| r.seconds).sum();
    let mut w = Writer::new_with_indent(Vec::new(), b' ', 2);
    w.write_event(Event::Decl(BytesDecl::new("1.0", Some("UTF-8"), None)))?;
    w.create_element("testsuites")
        .with_attribute(("name", "ecmo-gateway conformance"))
        .with_attribute((
            "tests",
            count(totals.passed + totals.failed + totals.skipped).as_str(),
        ))
        .with_attribute(("failures", count(totals.failed).as_str()))
        .with_attribute(("skipped", count(totals.skipped).as_str()))
        .with_attribute(("time", format!("{seconds:.3}").as_str()))
        .write_inner_content(|w| {
            for result in results {
                w.create_element("testsuite")
                    .with_attribute(("name", result.name.as_str()))
                    .with_attribute(("file", result.file.as_str()))
                    .with_attribute(("tests", count(result.steps.len()).as_str()))
                    .with_attribute((
                        "failures",
                        count(result.count(|v| matches!(v, Verdict::Failed(_)))).as_str(),
                    ))
                    .with_attribute((
                        "skipped",
                        count(result.count(|v| matches!(v, Verdict::Skipped(_)))).as_str(),
                    ))
                    .with_attribute(("time", format!("{:.3}", result.seconds).as_str()))
                    .write_inner_content(|w| {
                        for step in &result.steps {
                            let case = w
                                .create_element("testcase")
                                .with_attribute(("classname", result.name.as_str()))
                                .with_attribute(("name", step.name.as_str()))
                                .with_attribute(("time", format!("{:.3}", step.seconds).as_str()));
                            match &step.verdict {
                                Verdict::Passed => {
                                    case.write_empty()?;
                                }
                                Verdict::Failed(why) => {
                                    case.write_inner_content(|w| {
                                        w.create_element("failure")
                                            .with_attribute(("message", first_line(why)))
                                            .write_text_content(BytesText::new(why))?;
                                        Ok(())
                                    })?;
                                }
                                Verdict::Skipped(why) => {
                                    case.write_inner_content(|w| {
                                        w.create_element("skipped")
                                            .with_attribute(("message", why.as_str()))
                                            .write_empty()?;
                                        Ok(())
                                    })?;
                                }
                            }
                        }
                        Ok(())
                    })?;
            }
            Ok(())
        })?;
    let mut xml = w.into_inner();
    xml.push(b'\n');
    Ok(xml)
}

/// A few lines for a pull request or a go-live checklist.
pub fn markdown_summary(
    results: &[ScenarioResult],
    gateway: &str,
    ehr: Option<&str>,
    resources_checked: usize,
) -> String {
    let totals = Totals::of(results);
    let mut md = String::new();
    let verdict = if totals.failed == 0 {
        "PASSED"
    } else {
        "FAILED"
    };
    let _ = writeln!(md, "# ECMO gateway conformance: {verdict}\n");
    let _ = writeln!(md, "- Gateway: {gateway}");
    match ehr {
        Some(ehr) => {
            let _ = writeln!(
                md,
                "- EHR: {ehr} ({resources_checked} stored resources read back and checked against FHIR R4 and the ECMO profiles)"
            );
        }
        None => {
            let _ = writeln!(md, "- EHR: not given, EHR expectations not checked");
        }
    }
    let _ = writeln!(
        md,
        "- Steps: {} passed, {} failed, {} skipped, in {} scenarios\n",
        totals.passed,
        totals.failed,
        totals.skipped,
        results.len()
    );
    let _ = writeln!(md, "| Scenario | Passed | Failed | Skipped |");
    let _ = writeln!(md, "|---|---:|---:|---:|");
    for r in results {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            r.name,
            r.count(|v| *v == Verdict::Passed),
            r.count(|v| matches!(v, Verdict::Failed(_))),
            r.count(|v| matches!(v, Verdict::Skipped(_))),
        );
    }
    let failures: Vec<_> = results
        .iter()
        .flat_map(|r| r.steps.iter().map(move |s| (r, s)))
        .filter_map(|(r, s)| match &s.verdict {
            Verdict::Failed(why) => Some((r, s, why)),
            _ => None,
        })
        .collect();
    if !failures.is_empty() {
        let _ = writeln!(md, "\n## Failures\n");
        for (r, s, why) in failures {
            let _ = writeln!(md, "- **{}** / {}: {}", r.name, s.name, first_line(why));
        }
    }
    md
}

fn count(n: usize) -> String {
    n.to_string()
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suite::runner::StepResult;

    #[test]
    fn junit_counts_and_escapes() {
        let results = vec![ScenarioResult {
            name: "s<1>".into(),
            file: "s.json".into(),
            description: String::new(),
            seconds: 0.5,
            steps: vec![
                StepResult {
                    name: "ok".into(),
                    verdict: Verdict::Passed,
                    seconds: 0.1,
                },
                StepResult {
                    name: "bad".into(),
                    verdict: Verdict::Failed("expected 422 & got \"200\"\nbody".into()),
                    seconds: 0.1,
                },
                StepResult {
                    name: "later".into(),
                    verdict: Verdict::Skipped("earlier failed".into()),
                    seconds: 0.0,
                },
            ],
        }];
        let xml = String::from_utf8(junit_xml(&results).unwrap()).unwrap();
        assert!(
            xml.contains(
                r#"<testsuites name="ecmo-gateway conformance" tests="3" failures="1" skipped="1""#
            ),
            "{xml}"
        );
        assert!(xml.contains("name=\"s&lt;1&gt;\""), "{xml}");
        assert!(xml.contains("expected 422 &amp; got"), "{xml}");
        let md = markdown_summary(&results, "https://gw", None, 0);
        assert!(
            md.contains("FAILED") && md.contains("| s<1> | 1 | 1 | 1 |"),
            "{md}"
        );
    }
}
