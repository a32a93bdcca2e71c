//! The rules of a request that creates model versions, apart from the
//! database that holds what they read.
//!
//! - Which columns of a source become a model's features: those an INSERT
//!   lists, those a selection's candidate picks (`features` clauses of
//!   docs/selection.md), those a derived version's change adds or removes.
//! - How a candidate's settings or a change rewrite the options as written.
//! - Whether an imported ONNX graph fits the columns it is mapped to.
//!
//! fdw/ reads the source's columns (as the user) and the parent's request,
//! calls these, and writes the outcome; everything here is plain data in,
//! plain data out, tested with `cargo test`.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::mst::{Change, Selection};
use crate::onnx_graph::{ImportInput, TensorInfo, FLOAT, STRING};
use crate::spec::{Feature, FeatureKind, SqlKind, Task, TaskChoice, TrainOptions};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    #[error("column \"{column}\" does not exist in {relation}")]
    UnknownColumn { relation: String, column: String },
    #[error("column \"{column}\" of {relation} has type {type_name}, which Cerebro cannot use as {role}")]
    UnsupportedType { relation: String, column: String, type_name: String, role: &'static str },
    #[error("column \"{0}\" is listed twice in features")]
    DuplicateFeature(String),
    #[error("column \"{column}\" cannot be both the {role} and a feature")]
    FeatureConflict { column: String, role: &'static str },
    #[error("column \"{0}\" cannot be both the target and the key")]
    KeyIsTarget(String),
    #[error("{relation} has no column Cerebro can use as a feature")]
    NoFeatures { relation: String },
    #[error("features is an empty list")]
    EmptyFeatures,
    #[error("column \"{column}\" is not a feature of the parent, so it cannot be removed")]
    NotAFeature { column: String },
    #[error("selection names table \"{table}\", but the source is {relation}")]
    SelectionTable { table: String, relation: String },
    #[error("cannot import the ONNX model: {0}")]
    ImportInvalid(String),
}

impl RequestError {
    pub fn hint(&self) -> Option<String> {
        match self {
            RequestError::UnsupportedType { .. } => {
                Some("Numeric, text, enum and boolean columns are supported; cast others in a view.".into())
            }
            RequestError::NoFeatures { .. } => Some("List the feature columns in the features column.".into()),
            RequestError::EmptyFeatures => Some(
                "Name at least one column, or leave features out to use every column but the target and key.".into(),
            ),
            RequestError::KeyIsTarget(_) => {
                Some("The key names each row in predictions; give a column that identifies rows, or none.".into())
            }
            _ => None,
        }
    }
}

type Result<T> = std::result::Result<T, RequestError>;

/// One column of a source, as its reader may see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    /// As declared (a domain, a typmod), for messages.
    pub type_name: String,
    /// None: of a type Cerebro cannot use.
    pub kind: Option<SqlKind>,
}

/// A source as the rules see it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SourceShape {
    /// The source as messages name it: `"schema"."relation"` or `(SELECT ...)`.
    pub relation: String,
    pub columns: Vec<Column>,
    /// When the source is a query: the columns of each table that a
    /// selection names whole (`t.*`), by the name written; see [`tables_to_read`].
    pub tables: BTreeMap<String, Vec<String>>,
}

impl SourceShape {
    pub fn column(&self, name: &str) -> Result<&Column> {
        self.columns
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| RequestError::UnknownColumn { relation: self.relation.clone(), column: name.to_owned() })
    }

    /// Usable columns but the target and key, in source order.
    fn candidates<'a>(&'a self, target: &'a str, key: Option<&'a str>) -> impl Iterator<Item = &'a Column> + 'a {
        self.columns.iter().filter(move |c| c.kind.is_some() && c.name != target && Some(c.name.as_str()) != key)
    }
}

/// The query a source names, when it is one: `(SELECT ...)`.
pub fn source_query(source: &str) -> Option<&str> {
    let t = source.trim();
    (t.len() >= 2 && t.starts_with('(') && t.ends_with(')')).then(|| t[1..t.len() - 1].trim())
}

/// Whether `source` is a query written without its parentheses (`SELECT *
/// FROM t`), which would otherwise be read, and refused, as a malformed
/// relation name.
pub fn unparenthesised_query(source: &str) -> bool {
    let t = source.trim_start();
    let word = t.split(|c: char| !c.is_ascii_alphabetic()).next().unwrap_or("");
    ["select", "with", "values", "table"].iter().any(|k| word.eq_ignore_ascii_case(k))
        && t[word.len()..].starts_with(char::is_whitespace)
}

/// A model's features: the columns `listed`, in order, or when none are
/// listed every column of a usable type but the target and the key, each
/// of the kind `options` make it ([`TrainOptions::feature_kind`]). The
/// second list holds the columns left out for their type, for the caller
/// to tell the user about.
pub fn features<'a>(
    source: &'a SourceShape,
    target: &str,
    key: Option<&str>,
    listed: Option<&[String]>,
    options: &TrainOptions,
) -> Result<(Vec<Feature>, Vec<&'a Column>)> {
    if key == Some(target) {
        return Err(RequestError::KeyIsTarget(target.to_owned()));
    }
    let mut features: Vec<Feature> = Vec::new();
    let mut unusable = Vec::new();
    match listed {
        Some([]) => return Err(RequestError::EmptyFeatures),
        Some(names) => {
            for name in names {
                let column = source.column(name)?;
                if name == target {
                    return Err(RequestError::FeatureConflict { column: name.clone(), role: "target" });
                }
                if Some(name.as_str()) == key {
                    return Err(RequestError::FeatureConflict { column: name.clone(), role: "key" });
                }
                if features.iter().any(|f| &f.name == name) {
                    return Err(RequestError::DuplicateFeature(name.clone()));
                }
                let kind = column.kind.ok_or_else(|| unsupported(source, column, "a feature"))?;
                features.push(Feature { name: name.clone(), kind: options.feature_kind(name, kind) });
            }
        }
        None => {
            for column in &source.columns {
                if column.name == target || Some(column.name.as_str()) == key {
                    continue;
                }
                match column.kind {
                    Some(kind) => features
                        .push(Feature { name: column.name.clone(), kind: options.feature_kind(&column.name, kind) }),
                    None => unusable.push(column),
                }
            }
        }
    }
    if features.is_empty() {
        return Err(RequestError::NoFeatures { relation: source.relation.clone() });
    }
    Ok((features, unusable))
}

/// The target's kind, or why the column cannot be one.
pub fn target_kind(source: &SourceShape, target: &str) -> Result<SqlKind> {
    let column = source.column(target)?;
    column.kind.ok_or_else(|| unsupported(source, column, "a target"))
}

fn unsupported(source: &SourceShape, column: &Column, role: &'static str) -> RequestError {
    RequestError::UnsupportedType {
        relation: source.relation.clone(),
        column: column.name.clone(),
        type_name: column.type_name.clone(),
        role,
    }
}

/// The tables whose columns [`selected_columns`] needs: those `selections`
/// name whole (`t.*`) when the source is a query.
pub fn tables_to_read<'a>(selections: impl IntoIterator<Item = &'a Selection>, source: &str) -> Vec<String> {
    if source_query(source).is_none() {
        return Vec::new();
    }
    let mut tables: Vec<String> = Vec::new();
    for s in selections {
        if let (Some(table), None) = (&s.table, &s.columns) {
            if !tables.contains(table) {
                tables.push(table.clone());
            }
        }
    }
    tables
}

/// The columns one selection names: its own list, or for `*` and `t.*`
/// every usable column of the source but the target and key. Of a query,
/// `t.*` is every column of table t that the query returns under the same
/// name; of a relation, `t` must be the relation.
pub fn selected_columns(s: &Selection, source: &SourceShape, target: &str, key: Option<&str>) -> Result<Vec<String>> {
    let short = |name: &str| name.rsplit('.').next().unwrap_or(name).trim_matches('"').to_string();
    if let Some(table) = &s.table {
        if source_query(&source.relation).is_some() {
            if s.columns.is_none() {
                let of_table = source.tables.get(table).map(Vec::as_slice).unwrap_or_default();
                return Ok(source
                    .candidates(target, key)
                    .filter(|c| of_table.contains(&c.name))
                    .map(|c| c.name.clone())
                    .collect());
            }
        } else if short(table) != short(&source.relation) {
            return Err(RequestError::SelectionTable { table: table.clone(), relation: source.relation.clone() });
        }
    }
    Ok(match &s.columns {
        Some(names) => names.clone(),
        None => source.candidates(target, key).map(|c| c.name.clone()).collect(),
    })
}

/// The feature columns a selection candidate picks: what its selections
/// name, less what its exclusions (`-c`) name.
pub fn candidate_features(
    selections: &[Selection],
    source: &SourceShape,
    target: &str,
    key: Option<&str>,
) -> Result<Vec<String>> {
    let mut picked: Vec<String> = Vec::new();
    for s in selections.iter().filter(|s| !s.exclude) {
        for c in selected_columns(s, source, target, key)? {
            if !picked.contains(&c) {
                picked.push(c);
            }
        }
    }
    for s in selections.iter().filter(|s| s.exclude) {
        let out = selected_columns(s, source, target, key)?;
        picked.retain(|c| !out.contains(c));
    }
    Ok(picked)
}

/// A parent's features with a change's selections applied in order: a
/// name or group adds, `-c` removes (and must name a feature).
pub fn apply_features(
    parent: &[String],
    change: &Change,
    source: &SourceShape,
    target: &str,
    key: Option<&str>,
) -> Result<Vec<String>> {
    let mut features = parent.to_vec();
    for s in &change.features {
        let named = selected_columns(s, source, target, key)?;
        if s.exclude {
            if let Some(c) = named.iter().find(|c| !features.contains(c)) {
                return Err(RequestError::NotAFeature { column: c.clone() });
            }
            features.retain(|c| !named.contains(c));
        } else {
            for c in named {
                if !features.contains(&c) {
                    features.push(c);
                }
            }
        }
    }
    Ok(features)
}

/// `options` with `set` applied: `encodings` merge column by column, any
/// other key is replaced.
pub fn merge_options(options: &mut Map<String, Value>, set: &Map<String, Value>) {
    for (key, value) in set {
        match (key.as_str(), options.get_mut("encodings").and_then(|e| e.as_object_mut()), value.as_object()) {
            ("encodings", Some(existing), Some(more)) => existing.extend(more.clone()),
            _ => {
                options.insert(key.clone(), value.clone());
            }
        }
    }
}

/// A parent's options (as stored) with a change's settings and appends
/// (`hidden += [64]`).
pub fn apply_options(parent: &Value, change: &Change) -> Value {
    let mut options = parent.as_object().cloned().unwrap_or_default();
    merge_options(&mut options, &change.set);
    for (key, more) in &change.append {
        let mut list = options.get(key).and_then(|v| v.as_array()).cloned().unwrap_or_default();
        list.extend(more.as_array().cloned().unwrap_or_default());
        options.insert(key.clone(), Value::Array(list));
    }
    Value::Object(options)
}

fn invalid(message: String) -> RequestError {
    RequestError::ImportInvalid(message)
}

/// An imported model's task, which must be fixed, with the labels it needs:
/// a binary model two (negative, then positive), a multiclass one its labels
/// in output order, a regression none.
pub fn import_task(choice: TaskChoice, labels: &[String]) -> Result<Task> {
    for (i, label) in labels.iter().enumerate() {
        if let Some(first) = labels[..i].iter().position(|l| l == label) {
            return Err(invalid(format!(
                "label \"{label}\" is given twice (at {} and {}): each output column is one class",
                first + 1,
                i + 1
            )));
        }
    }
    let labels = labels.len();
    let task = match choice {
        TaskChoice::Fixed(t) => t,
        TaskChoice::Auto => {
            return Err(invalid("an imported model's task must be binary, multiclass or regression".into()))
        }
    };
    match (task, labels) {
        (Task::Binary, 2) | (Task::Regression, 0) => Ok(task),
        (Task::Multiclass, n) if n >= 2 => Ok(task),
        (Task::Binary, n) => Err(invalid(format!("a binary model needs 2 labels (negative, then positive), not {n}"))),
        (Task::Multiclass, n) => Err(invalid(format!("a multiclass model needs its labels in output order, not {n}"))),
        (Task::Regression, _) => Err(invalid("a regression model takes no labels".into())),
    }
}

/// The columns each graph input takes, from `{"input": "col"}` or
/// `{"input": ["col", ...]}`, in graph order.
pub fn import_mapping(inputs: &Value, graph: &[TensorInfo]) -> Result<Vec<(String, Vec<String>)>> {
    let object = inputs
        .as_object()
        .ok_or_else(|| invalid("inputs must be a JSON object from graph input names to column names".into()))?;
    // A graph that reads nothing gives the same output whatever the row:
    // not a model of the rows, and not shaped by them either.
    if graph.is_empty() {
        return Err(invalid("the graph has no inputs: a model must read at least one column".into()));
    }
    let names: Vec<&str> = graph.iter().map(|i| i.name.as_str()).collect();
    if let Some(unknown) = object.keys().find(|k| !names.contains(&k.as_str())) {
        return Err(invalid(format!("the graph has no input \"{unknown}\"; its inputs are: {}", names.join(", "))));
    }
    let not_columns =
        |input: &TensorInfo| invalid(format!("input \"{}\" must map to a column or a list of them", input.name));
    graph
        .iter()
        .map(|input| {
            let columns: Vec<String> = match object.get(&input.name) {
                None => return Err(invalid(format!("graph input \"{}\" is not mapped to any column", input.name))),
                Some(Value::String(c)) => vec![c.clone()],
                Some(Value::Array(cs)) => cs
                    .iter()
                    .map(|c| c.as_str().map(str::to_owned))
                    .collect::<Option<Vec<_>>>()
                    .filter(|cs| !cs.is_empty())
                    .ok_or_else(|| not_columns(input))?,
                Some(_) => return Err(not_columns(input)),
            };
            Ok((input.name.clone(), columns))
        })
        .collect()
}

/// The output to score with (the one named, else the only float one),
/// checked against the task.
pub fn scored_output<'g>(
    graph: &'g [TensorInfo],
    wanted: Option<&str>,
    task: Task,
    classes: usize,
) -> Result<&'g TensorInfo> {
    let floats: Vec<&TensorInfo> = graph.iter().filter(|o| o.elem_type == FLOAT).collect();
    let output = match wanted {
        Some(name) => graph
            .iter()
            .find(|o| o.name == name)
            .ok_or_else(|| invalid(format!("the graph has no output \"{name}\"")))?,
        None if floats.len() == 1 => floats[0],
        None => {
            let names: Vec<&str> = graph.iter().map(|o| o.name.as_str()).collect();
            return Err(invalid(format!(
                "name the output to score with; the graph's outputs are: {}",
                names.join(", ")
            )));
        }
    };
    if output.elem_type != FLOAT {
        return Err(invalid(format!(
            "output \"{}\" is a {} tensor; Cerebro scores from a float tensor",
            output.name,
            output.type_name()
        )));
    }
    let width = if output.dims.len() >= 2 { output.dims[1] } else { Some(1) };
    let allowed: &[usize] = match task {
        Task::Binary => &[1, 2],
        Task::Multiclass => std::slice::from_ref(&classes),
        Task::Regression => &[1],
    };
    if let Some(w) = width {
        if task == Task::Multiclass && w >= 2 && w as usize != classes {
            // The graph may be right and the labels short or long.
            return Err(invalid(format!(
                "output \"{}\" has {w} columns, one a class, but {classes} class labels are given; \
                 give one label for each of its columns, in their order",
                output.name
            )));
        }
        if !allowed.contains(&(w as usize)) {
            return Err(invalid(format!(
                "output \"{}\" has {w} column(s); a {} model needs {}",
                output.name,
                task.as_str(),
                allowed.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(" or ")
            )));
        }
    }
    Ok(output)
}

/// An imported model's features and feed layout: each graph input fed by
/// the columns mapped to it, floats from numeric columns and strings from
/// one categorical column (or an integer one, as its text: what Cerebro
/// exports for an integer it read as a category), every column once.
pub fn import_features(
    groups: &[(String, Vec<String>)],
    graph: &[TensorInfo],
    source: &SourceShape,
) -> Result<(Vec<Feature>, Vec<ImportInput>)> {
    let mut features: Vec<Feature> = Vec::new();
    let mut layout = Vec::new();
    for ((input_name, columns), info) in groups.iter().zip(graph) {
        let wanted = match info.elem_type {
            FLOAT => FeatureKind::Numeric,
            STRING => FeatureKind::Categorical,
            _ => {
                return Err(invalid(format!(
                    "graph input \"{input_name}\" is a {} tensor; Cerebro feeds float and string tensors",
                    info.type_name()
                )));
            }
        };
        if wanted == FeatureKind::Categorical && columns.len() != 1 {
            return Err(invalid(format!("string input \"{input_name}\" takes one column, not {}", columns.len())));
        }
        if let Some(Some(width)) = info.dims.get(1) {
            if *width as usize != columns.len() {
                return Err(invalid(format!(
                    "graph input \"{input_name}\" takes {width} column(s); {} are mapped to it",
                    columns.len()
                )));
            }
        }
        for name in columns {
            let column = source.column(name)?;
            let fits = match (column.kind, wanted) {
                (Some(SqlKind::Integer), FeatureKind::Categorical) => true,
                (kind, wanted) => kind.map(SqlKind::feature_kind) == Some(wanted),
            };
            if !fits {
                return Err(invalid(format!(
                    "column \"{name}\" ({}) cannot feed input \"{input_name}\", a {} tensor",
                    column.type_name,
                    info.type_name()
                )));
            }
            if features.iter().any(|f| &f.name == name) {
                return Err(RequestError::DuplicateFeature(name.clone()));
            }
            features.push(Feature { name: name.clone(), kind: wanted });
        }
        layout.push(ImportInput { name: input_name.clone(), columns: columns.len() });
    }
    Ok((features, layout))
}

/// Checks an import's `target` column: a column of the source, not one the
/// graph reads, of a kind the task can measure (a number for a regression).
/// Its rows are frozen with the features, so that the graph's importance and
/// surrogate can be measured on them.
pub fn import_target(source: &SourceShape, features: &[Feature], target: &str, task: Task) -> Result<()> {
    let column = source.column(target)?;
    if features.iter().any(|f| f.name == target) {
        return Err(invalid(format!("the target \"{target}\" also feeds a graph input")));
    }
    let fits = match (task, column.kind) {
        (_, None) => false,
        (Task::Regression, Some(kind)) => matches!(kind, SqlKind::Integer | SqlKind::Real),
        (Task::Binary | Task::Multiclass, Some(_)) => true,
    };
    if !fits {
        return Err(invalid(format!(
            "the target \"{target}\" ({}) cannot be the target of a {} model",
            column.type_name,
            task.as_str()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mst::parse_change;
    use serde_json::json;

    fn column(name: &str, kind: Option<SqlKind>) -> Column {
        Column { name: name.into(), type_name: if kind.is_some() { "integer" } else { "point" }.into(), kind }
    }

    /// `public.t (id, a, b, c, p point, y)`.
    fn table() -> SourceShape {
        let numeric = Some(SqlKind::Integer);
        SourceShape {
            relation: "\"public\".\"t\"".into(),
            columns: vec![
                column("id", numeric),
                column("a", numeric),
                column("b", Some(SqlKind::Text)),
                column("c", numeric),
                column("p", None),
                column("y", Some(SqlKind::Boolean)),
            ],
            tables: BTreeMap::new(),
        }
    }

    fn names(features: &[Feature]) -> Vec<&str> {
        features.iter().map(|f| f.name.as_str()).collect()
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn features_default_to_every_usable_column_but_target_and_key() {
        let source = table();
        let (features, unusable) = features(&source, "y", Some("id"), None, &TrainOptions::default()).unwrap();
        assert_eq!(names(&features), ["a", "b", "c"]);
        assert_eq!(features[1].kind, FeatureKind::Categorical);
        assert_eq!(unusable.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["p"]);
        let both = super::features(&source, "y", Some("y"), None, &TrainOptions::default()).unwrap_err();
        assert_eq!(both, RequestError::KeyIsTarget("y".into()));
    }

    #[test]
    fn a_categorical_encoding_makes_an_integer_column_a_category() {
        let source = table();
        let options = |v: Value| TrainOptions::from_json(Some(&v)).unwrap();
        let kinds = |o: &TrainOptions, listed: Option<&[String]>| {
            features(&source, "y", Some("id"), listed, o).unwrap().0.into_iter().map(|f| f.kind).collect::<Vec<_>>()
        };
        use FeatureKind::{Categorical, Numeric};
        for encoding in [json!("category"), json!("onehot"), json!("embedding"), json!(4)] {
            let o = options(json!({ "encodings": { "a": encoding } }));
            assert_eq!(kinds(&o, None), [Categorical, Categorical, Numeric], "{encoding}");
            assert_eq!(kinds(&o, Some(&strings(&["c", "a"]))), [Numeric, Categorical], "{encoding}");
        }
        // A numeric encoding keeps it a number; a text column is a category either way.
        let o = options(json!({"encodings": {"a": "periodic", "b": "category"}}));
        assert_eq!(kinds(&o, None), [Numeric, Categorical, Numeric]);
    }

    #[test]
    fn listed_features_are_checked_in_order() {
        let source = table();
        let listed = |l: &[&str]| {
            features(&source, "y", Some("id"), Some(&strings(l)), &TrainOptions::default()).map(|(f, _)| f)
        };
        assert_eq!(names(&listed(&["c", "a"]).unwrap()), ["c", "a"]);
        assert_eq!(
            listed(&["a", "nope"]).unwrap_err(),
            RequestError::UnknownColumn { relation: source.relation.clone(), column: "nope".into() }
        );
        assert_eq!(listed(&["y"]).unwrap_err(), RequestError::FeatureConflict { column: "y".into(), role: "target" });
        assert_eq!(listed(&["id"]).unwrap_err(), RequestError::FeatureConflict { column: "id".into(), role: "key" });
        assert_eq!(listed(&["a", "a"]).unwrap_err(), RequestError::DuplicateFeature("a".into()));
        let err = listed(&["p"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "column \"p\" of \"public\".\"t\" has type point, which Cerebro cannot use as a feature"
        );
        assert!(err.hint().is_some());
        assert_eq!(listed(&[]).unwrap_err(), RequestError::EmptyFeatures);
    }

    #[test]
    fn a_target_must_be_of_a_usable_type() {
        let source = table();
        assert_eq!(target_kind(&source, "y").unwrap(), SqlKind::Boolean);
        assert!(matches!(target_kind(&source, "p"), Err(RequestError::UnsupportedType { role: "a target", .. })));
        assert!(matches!(target_kind(&source, "q"), Err(RequestError::UnknownColumn { .. })));
    }

    #[test]
    fn a_change_adds_and_removes_features() {
        let source = table();
        let parent = strings(&["a", "b"]);
        let change = parse_change("features -a, c").unwrap();
        assert_eq!(apply_features(&parent, &change, &source, "y", Some("id")).unwrap(), ["b", "c"]);
        let change = parse_change("features t.*").unwrap();
        assert_eq!(apply_features(&parent, &change, &source, "y", Some("id")).unwrap(), ["a", "b", "c"]);
        let change = parse_change("features -c").unwrap();
        assert_eq!(
            apply_features(&parent, &change, &source, "y", None).unwrap_err(),
            RequestError::NotAFeature { column: "c".into() }
        );
        let change = parse_change("features other.*").unwrap();
        assert!(matches!(
            apply_features(&parent, &change, &source, "y", None),
            Err(RequestError::SelectionTable { .. })
        ));
    }

    #[test]
    fn a_query_sources_table_group_is_the_tables_columns_the_query_returns() {
        let mut source = table();
        source.relation = "(SELECT t.*, u.w FROM t JOIN u USING (id))".into();
        source.columns.push(column("w", Some(SqlKind::Integer)));
        let change = parse_change("features u.*, -b").unwrap();
        assert_eq!(tables_to_read(&change.features, &source.relation), ["u"]);
        assert_eq!(tables_to_read(&change.features, "\"public\".\"t\""), Vec::<String>::new());
        source.tables.insert("u".into(), strings(&["id", "w", "z"]));
        // id is the key, z is not returned by the query.
        assert_eq!(candidate_features(&change.features, &source, "y", Some("id")).unwrap(), ["w"]);
        let parent = strings(&["a", "b"]);
        assert_eq!(apply_features(&parent, &change, &source, "y", Some("id")).unwrap(), ["a", "w"]);
    }

    #[test]
    fn a_query_without_its_parentheses_is_told_from_a_name() {
        for query in ["SELECT * FROM t", "  with x AS (SELECT 1) SELECT * FROM x", "VALUES (1)", "table\tt"] {
            assert!(unparenthesised_query(query), "{query}");
        }
        for name in ["t", "public.t", "values_2024", "table1", "\"select\"", "(SELECT 1)", "selected", ""] {
            assert!(!unparenthesised_query(name), "{name}");
        }
    }

    #[test]
    fn a_spec_that_only_excludes_reads_every_other_column() {
        let source = table();
        let picked = |text: &str| -> Vec<Vec<String>> {
            let spec = crate::mst::parse(text).unwrap();
            spec.expand(text, 10)
                .unwrap()
                .iter()
                .map(|c| candidate_features(&c.features, &source, "y", Some("id")).unwrap())
                .collect()
        };
        assert_eq!(picked("features -b"), [strings(&["a", "c"])]);
        assert_eq!(picked("features -b?"), [strings(&["a", "c"]), strings(&["a", "b", "c"])]);
        // An optional group that adds is not an exclusion: no column is implied.
        assert_eq!(picked("features a?, -b"), [strings(&["a"]), Vec::<String>::new()]);
    }

    #[test]
    fn options_merge_encodings_by_column_and_replace_the_rest() {
        let mut options = json!({"hidden": [64], "encodings": {"a": "ple"}}).as_object().cloned().unwrap();
        let set = json!({"hidden": [8], "encodings": {"b": "onehot"}}).as_object().cloned().unwrap();
        merge_options(&mut options, &set);
        assert_eq!(Value::Object(options), json!({"hidden": [8], "encodings": {"a": "ple", "b": "onehot"}}));
        let change = parse_change("model hidden += [16]\ntrain lr = 0.01").unwrap();
        let applied = apply_options(&json!({"hidden": [64, 32]}), &change);
        assert_eq!(applied["hidden"], json!([64, 32, 16]));
        assert_eq!(applied.as_object().unwrap().len(), 2, "{applied}");
    }

    fn tensor(name: &str, elem_type: i32, dims: &[Option<i64>]) -> TensorInfo {
        TensorInfo { name: name.into(), elem_type, dims: dims.to_vec() }
    }

    #[test]
    fn an_import_maps_graph_inputs_to_columns_of_their_kind() {
        let source = table();
        let graph = [tensor("num", FLOAT, &[None, Some(2)]), tensor("cat", STRING, &[None, Some(1)])];
        let groups = import_mapping(&json!({"num": ["a", "c"], "cat": "b"}), &graph).unwrap();
        let (features, layout) = import_features(&groups, &graph, &source).unwrap();
        assert_eq!(names(&features), ["a", "c", "b"]);
        assert_eq!(layout.iter().map(|i| i.columns).collect::<Vec<_>>(), [2, 1]);

        let message = |r: Result<Vec<(String, Vec<String>)>>| r.unwrap_err().to_string();
        assert_eq!(
            message(import_mapping(&json!({"num": "a", "x": "b"}), &graph)),
            "cannot import the ONNX model: the graph has no input \"x\"; its inputs are: num, cat"
        );
        assert!(message(import_mapping(&json!({"num": "a"}), &graph)).contains("\"cat\" is not mapped"));
        assert!(message(import_mapping(&json!({"num": [], "cat": "b"}), &graph)).contains("must map to a column"));
        let groups = import_mapping(&json!({"num": ["a"], "cat": "b"}), &graph).unwrap();
        assert!(import_features(&groups, &graph, &source).unwrap_err().to_string().contains("takes 2 column(s)"));
        let none = import_mapping(&json!({}), &[]).unwrap_err().to_string();
        assert!(none.contains("the graph has no inputs"), "{none}");
        let groups = import_mapping(&json!({"num": ["a", "b"], "cat": "b"}), &graph).unwrap();
        assert!(import_features(&groups, &graph, &source).unwrap_err().to_string().contains("cannot feed input"));
        let groups = import_mapping(&json!({"num": ["a", "a"], "cat": "b"}), &graph).unwrap();
        assert_eq!(import_features(&groups, &graph, &source).unwrap_err(), RequestError::DuplicateFeature("a".into()));
        // An integer column feeds a string input as its text (a category);
        // a text column never feeds a float one.
        let groups = import_mapping(&json!({"num": ["c", "id"], "cat": "a"}), &graph).unwrap();
        let (features, _) = import_features(&groups, &graph, &source).unwrap();
        assert_eq!(
            features.iter().map(|f| (f.name.as_str(), f.kind)).collect::<Vec<_>>(),
            [("c", FeatureKind::Numeric), ("id", FeatureKind::Numeric), ("a", FeatureKind::Categorical)]
        );
    }

    #[test]
    fn an_imports_target_is_another_column_its_task_can_measure() {
        let source = table();
        let features = [Feature { name: "a".into(), kind: FeatureKind::Numeric }];
        assert_eq!(import_target(&source, &features, "b", Task::Binary), Ok(()));
        assert_eq!(import_target(&source, &features, "c", Task::Regression), Ok(()));
        let message =
            |target: &str, task: Task| import_target(&source, &features, target, task).unwrap_err().to_string();
        assert_eq!(
            message("a", Task::Binary),
            "cannot import the ONNX model: the target \"a\" also feeds a graph input"
        );
        assert_eq!(
            message("b", Task::Regression),
            "cannot import the ONNX model: the target \"b\" (integer) cannot be the target of a regression model"
        );
        assert!(message("p", Task::Multiclass).contains("(point) cannot be the target of a multiclass model"));
        assert!(matches!(
            import_target(&source, &features, "nope", Task::Binary),
            Err(RequestError::UnknownColumn { .. })
        ));
    }

    #[test]
    fn an_imports_output_and_labels_fit_its_task() {
        let outputs = [tensor("label", 7, &[None]), tensor("probabilities", FLOAT, &[None, Some(2)])];
        let output = scored_output(&outputs, None, Task::Binary, 2).unwrap();
        assert_eq!(output.name, "probabilities");
        use crate::onnx_graph::positive_column;
        assert_eq!((positive_column(2), positive_column(1)), (1, 0), "the second of two, else the only one");
        assert!(scored_output(&outputs, Some("label"), Task::Binary, 2).is_err());
        assert!(scored_output(&outputs, None, Task::Regression, 0).unwrap_err().to_string().contains("needs 1"));
        let short = scored_output(&outputs, None, Task::Multiclass, 3).unwrap_err().to_string();
        assert!(short.contains("has 2 columns, one a class, but 3 class labels are given"), "{short}");
        let labels = |names: &[&str]| strings(names);
        assert_eq!(import_task(TaskChoice::Fixed(Task::Binary), &labels(&["no", "yes"])).unwrap(), Task::Binary);
        assert!(import_task(TaskChoice::Fixed(Task::Binary), &labels(&["a", "b", "c"])).is_err());
        assert!(import_task(TaskChoice::Fixed(Task::Regression), &labels(&["a"])).is_err());
        assert!(import_task(TaskChoice::Fixed(Task::Multiclass), &labels(&["a"])).is_err());
        assert!(import_task(TaskChoice::Auto, &labels(&["no", "yes"])).is_err());
        let twice = import_task(TaskChoice::Fixed(Task::Multiclass), &labels(&["a", "b", "a"])).unwrap_err();
        assert_eq!(
            twice.to_string(),
            "cannot import the ONNX model: label \"a\" is given twice (at 1 and 3): each output column is one class"
        );
    }
}
