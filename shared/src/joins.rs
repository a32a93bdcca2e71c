//! Joins found from declared foreign keys (`features joins(auto)`,
//! docs/selection.md, "Joins found from foreign keys").
//!
//! fdw/ reads the source table's foreign keys, and those of the tables they
//! reference when two hops are asked, with each table's row count and the
//! distinct values of each one-column key; [`plan`] decides which joins the
//! selection searches and which it prunes, and writes the query that reads
//! the source with the joins kept. Each kept join's columns become one
//! group the search includes or leaves out ([`JoinPlan::features_text`]).
//!
//! The pruning rule is the tuple ratio of Kumar et al. ("To Join or Not to
//! Join?", SIGMOD 2016) and Shah et al. (2017, for networks and trees): when
//! the table joined holds few rows relative to the rows learned from, the
//! foreign key, itself a feature, already says everything the joined row
//! can (each of its values stands for one row of the joined table) and the
//! model sees enough rows per value to learn it; the joined columns add
//! width, not information. A join is pruned when
//! - its key is one column, a categorical feature of every candidate,
//! - the encoding keeps each of the key's distinct values as a category of
//!   its own (at most `max_categories` of them: with more, the rarer values
//!   share one code and the joined columns can say what the key no longer
//!   does), and
//! - rows learned from / rows of the joined table ≥ [`TUPLE_RATIO`].
//!
//! A composite key is never one feature, so its join is always kept (as
//! the weather on origin and hour of nycflights13). A table the user may not
//! read is left out and said why. The other way round, where a join is kept
//! and its key is one categorical feature, the search also leaves the key
//! out: the joined columns may say what the key would with far fewer
//! parameters (nycflights13's tails, 4,043 of them, against eight columns
//! of planes).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::mst::written_name;
use crate::sql::quote_ident;

/// Rows learned from per row of the joined table at or above which a
/// one-column key stands in for its join (Kumar et al.'s threshold for the
/// tuple ratio rule; Shah et al. found networks and trees safe lower still).
pub const TUPLE_RATIO: f64 = 20.0;
/// `joins(auto, hops = n)`: one hop out from the source (the default) or two.
pub const MAX_HOPS: u32 = 2;
/// Joined columns are named `<prefix>__<column>`.
pub const SEPARATOR: &str = "__";
/// PostgreSQL's longest identifier, in bytes (NAMEDATALEN - 1).
pub const MAX_NAME_BYTES: usize = 63;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JoinsError {
    #[error(
        "a joined column would be named \"{name}\", which is longer than the {MAX_NAME_BYTES} bytes PostgreSQL keeps"
    )]
    NameTooLong { name: String },
    #[error("a joined column would be named \"{name}\", which {relation} already has")]
    NameTaken { name: String, relation: String },
}

impl JoinsError {
    pub fn hint(&self) -> Option<String> {
        Some(
            "Write the join yourself in a view or a query source, naming its columns, or leave joins(auto) out.".into(),
        )
    }
}

/// A foreign key as declared: `columns` of the table it is declared on
/// reference `referenced` of `table`.
#[derive(Debug, Clone, PartialEq)]
pub struct ForeignKey {
    pub constraint: String,
    pub columns: Vec<String>,
    /// The referenced table, as [`Table::relation`] names it.
    pub table: String,
    pub referenced: Vec<String>,
}

/// What fdw/ read of one table of the schema.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// Qualified and quoted: `"nyc"."planes"`.
    pub relation: String,
    /// Unquoted, unqualified: `planes`.
    pub name: String,
    pub rows: u64,
    /// Every column, in order, and whether it is categorical (text,
    /// boolean, enum: `Some(true)`), numeric (`Some(false)`) or of a type
    /// Cerebro cannot use (`None`).
    pub columns: Vec<(String, Option<bool>)>,
    pub foreign_keys: Vec<ForeignKey>,
    /// Distinct non-NULL values of each one-column foreign key's column.
    pub distinct: BTreeMap<String, u64>,
    /// Whether the user may read it.
    pub readable: bool,
}

impl Table {
    fn categorical(&self, column: &str) -> bool {
        self.columns.iter().any(|(c, kind)| c == column && *kind == Some(true))
    }
}

/// The source table and every table its foreign keys reach within the hops
/// asked, by [`Table::relation`].
#[derive(Debug, Clone, PartialEq)]
pub struct Schema {
    pub source: Table,
    pub tables: BTreeMap<String, Table>,
}

/// A join the selection searches: with its columns and without.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Join {
    /// The referenced table, qualified.
    pub table: String,
    /// Its columns' names start `<prefix>__`.
    pub prefix: String,
    /// The joined-from table's columns: the source's, or at hop 2 the
    /// columns (as the query names them) of the join it follows.
    pub on: Vec<String>,
    /// The columns of `table` that `on` references, in `on`'s order (empty
    /// in plans written before they were recorded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub referenced: Vec<String>,
    pub hop: u32,
    /// Rows learned from per row of the joined table.
    pub tuple_ratio: f64,
    /// The columns it adds, as the query names them.
    pub columns: Vec<String>,
    /// Its key is one categorical feature, which the search also leaves out
    /// (`-tailnum?`): with the joined columns there, a key of many values
    /// may add more parameters than information.
    #[serde(default)]
    pub key_searched: bool,
}

/// A join left out before training, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pruned {
    pub table: String,
    pub on: Vec<String>,
    pub hop: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tuple_ratio: Option<f64>,
    pub why: String,
}

/// What `joins(auto)` found: the query that reads the source with the joins
/// kept, the joins, and those pruned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinPlan {
    pub hops: u32,
    pub tuple_ratio_threshold: f64,
    #[serde(skip)]
    pub query: String,
    pub kept: Vec<Join>,
    pub pruned: Vec<Pruned>,
}

impl JoinPlan {
    /// The selections that stand for `joins(auto)` in the features clause:
    /// each kept join's columns, added and optionally left out again
    /// (`planes.{planes__year, ...}, -planes.{planes__year, ...}?`), so
    /// every candidate searches with and without each join, and later
    /// rounds may draw them (docs/selection.md, "Rounds").
    pub fn features_text(&self) -> Vec<String> {
        self.kept
            .iter()
            .filter(|j| !j.columns.is_empty())
            .map(|j| {
                let columns: Vec<String> = j.columns.iter().map(|c| written_name(c)).collect();
                let group = format!("{}.{{{}}}", j.prefix, columns.join(", "));
                match (j.key_searched, j.on.as_slice()) {
                    (true, [key]) => format!("{group}, -{group}?, -{}?", written_name(key)),
                    _ => format!("{group}, -{group}?"),
                }
            })
            .collect()
    }

    /// The query that reads `source` (a relation, or a query in
    /// parentheses, with the columns of the source the plan was made on)
    /// with the kept joins: what a version of the selection scores another
    /// source of the same shape through. Each joined column that is a
    /// feature is read under its name in the plan. None for a plan written
    /// before joins recorded the columns they reference.
    pub fn query_over(&self, source: &str) -> Option<String> {
        let mut select = vec!["s.*".to_string()];
        let mut from = vec![format!("{source} s")];
        for (i, join) in self.kept.iter().enumerate() {
            if join.referenced.len() != join.on.len() || join.on.is_empty() {
                return None;
            }
            let alias = format!("j{}", i + 1);
            let own = format!("{}{SEPARATOR}", join.prefix);
            for name in &join.columns {
                let column = name.strip_prefix(&own)?;
                select.push(format!("{alias}.{} AS {}", quote_ident(column), quote_ident(name)));
            }
            let mut condition = Vec::with_capacity(join.on.len());
            for (referenced, on) in join.referenced.iter().zip(&join.on) {
                // At hop 2, `on` names a column of the hop-1 join it
                // follows, whose alias is its place among the kept joins.
                let parent = if join.hop <= 1 {
                    ("s".to_string(), on.as_str())
                } else {
                    self.kept[..i]
                        .iter()
                        .enumerate()
                        .filter(|(_, p)| p.hop + 1 == join.hop)
                        .filter_map(|(k, p)| {
                            on.strip_prefix(&format!("{}{SEPARATOR}", p.prefix)).map(|c| (k, p.prefix.len(), c))
                        })
                        .max_by_key(|&(_, len, _)| len)
                        .map(|(k, _, column)| (format!("j{}", k + 1), column))?
                };
                condition.push(format!("{alias}.{} = {}.{}", quote_ident(referenced), parent.0, quote_ident(parent.1)));
            }
            from.push(format!("LEFT JOIN {} {alias} ON {}", join.table, condition.join(" AND ")));
        }
        Some(format!("(SELECT {} FROM {})", select.join(", "), from.join(" ")))
    }

    /// The plan with only the joins `columns` (joined columns) are read
    /// through: those that add one, and at a nearer hop those they follow.
    /// A row scored alone needs the keys these start from, not those of
    /// joins only other candidates of the selection read.
    pub fn reading(&self, columns: &[&str]) -> JoinPlan {
        let mut needed: Vec<bool> =
            self.kept.iter().map(|j| j.columns.iter().any(|c| columns.contains(&c.as_str()))).collect();
        for i in (0..self.kept.len()).rev() {
            let join = &self.kept[i];
            if !needed[i] || join.hop <= 1 {
                continue;
            }
            for (k, parent) in self.kept[..i].iter().enumerate() {
                let own = format!("{}{SEPARATOR}", parent.prefix);
                if parent.hop + 1 == join.hop && join.on.iter().any(|on| on.starts_with(&own)) {
                    needed[k] = true;
                }
            }
        }
        let kept = self.kept.iter().zip(needed).filter(|(_, n)| *n).map(|(j, _)| j.clone()).collect();
        JoinPlan { kept, query: String::new(), ..self.clone() }
    }

    /// Every column the kept joins add, as the query names them.
    pub fn joined_columns(&self) -> impl Iterator<Item = &str> {
        self.kept.iter().flat_map(|j| j.columns.iter().map(String::as_str))
    }
}

/// `name` as one identifier of the selection language: every character it
/// cannot hold as `_`, and `t_` before a leading digit.
fn bare_name(name: &str) -> String {
    let mut out: String =
        name.chars().map(|c| if c.is_alphabetic() || c == '_' || c.is_ascii_digit() { c } else { '_' }).collect();
    if !crate::mst::is_bare_name(&out) {
        out.insert_str(0, "t_");
    }
    out
}

/// The joins `joins(auto, hops)` searches on `schema`, and the query that
/// reads them. `features` are the source's columns every candidate reads
/// (for the pruning rule), `max_categories` the encoding's.
pub fn plan(schema: &Schema, hops: u32, features: &[String], max_categories: u32) -> Result<JoinPlan, JoinsError> {
    let hops = hops.clamp(1, MAX_HOPS);
    let source = &schema.source;
    let taken: Vec<&str> = source.columns.iter().map(|(c, _)| c.as_str()).collect();
    let mut plan = JoinPlan {
        hops,
        tuple_ratio_threshold: TUPLE_RATIO,
        query: String::new(),
        kept: Vec::new(),
        pruned: Vec::new(),
    };
    let mut select = vec!["s.*".to_string()];
    let mut from = vec![format!("{} s", source.relation)];
    let mut names: Vec<String> = Vec::new();

    // (table joined from, its alias in the query, its prefix, which of its
    // columns are features, how they are named) at each hop.
    struct From<'a> {
        table: &'a Table,
        alias: String,
        prefix: Option<String>,
        features: Vec<String>,
        named: BTreeMap<String, String>,
    }
    let mut frontier = vec![From {
        table: source,
        alias: "s".into(),
        prefix: None,
        features: features.to_vec(),
        named: source.columns.iter().map(|(c, _)| (c.clone(), c.clone())).collect(),
    }];
    for hop in 1..=hops {
        let mut next = Vec::new();
        for parent in &frontier {
            let keys = &parent.table.foreign_keys;
            for key in keys {
                // A key over a column the query does not name (a referenced
                // one, or one the language cannot write) is not followed.
                let Some(on) = key.columns.iter().map(|c| parent.named.get(c).cloned()).collect::<Option<Vec<_>>>()
                else {
                    continue;
                };
                let pruned = |tuple_ratio, why: String| Pruned {
                    table: key.table.clone(),
                    on: on.clone(),
                    hop,
                    tuple_ratio,
                    why,
                };
                let Some(table) = schema.tables.get(&key.table) else {
                    continue;
                };
                if !table.readable {
                    plan.pruned.push(pruned(None, "you may not read it".into()));
                    continue;
                }
                let tuple_ratio = source.rows as f64 / table.rows.max(1) as f64;
                let ratio = (tuple_ratio * 100.0).round() / 100.0;
                let key_feature = match key.columns.as_slice() {
                    [column] => parent.features.contains(column) && parent.table.categorical(column),
                    _ => false,
                };
                if let [column] = key.columns.as_slice() {
                    let distinct = parent.table.distinct.get(column).copied().unwrap_or(u64::MAX);
                    if key_feature && distinct <= u64::from(max_categories) && tuple_ratio >= TUPLE_RATIO {
                        plan.pruned.push(pruned(
                            Some(ratio),
                            format!(
                                "tuple ratio {ratio} ≥ {TUPLE_RATIO}: the feature \"{}\" (its {distinct} values each a category) stands in for the join",
                                on[0]
                            ),
                        ));
                        continue;
                    }
                }
                // The table's name, or where several keys reference it or a
                // table of the same name in another schema, the key's
                // columns (dest, origin); written as the language reads a
                // name ("School Dim" as School_Dim).
                let own_name = bare_name(&table.name);
                let same_name =
                    |k: &&ForeignKey| schema.tables.get(&k.table).is_some_and(|t| bare_name(&t.name) == own_name);
                let own = if keys.iter().filter(same_name).count() > 1 {
                    bare_name(&key.columns.join("_"))
                } else {
                    own_name
                };
                let prefix = match &parent.prefix {
                    Some(p) => format!("{p}{SEPARATOR}{own}"),
                    None => own,
                };
                let alias = format!("j{}", plan.kept.len() + 1);
                let mut named = BTreeMap::new();
                let mut columns = Vec::new();
                let mut features = Vec::new();
                for (column, kind) in &table.columns {
                    // The referenced columns equal the key's.
                    if key.referenced.contains(column) {
                        continue;
                    }
                    let name = format!("{prefix}{SEPARATOR}{column}");
                    if name.len() > MAX_NAME_BYTES {
                        return Err(JoinsError::NameTooLong { name });
                    }
                    if taken.contains(&name.as_str()) || names.contains(&name) {
                        return Err(JoinsError::NameTaken { name, relation: source.relation.clone() });
                    }
                    select.push(format!("{alias}.{} AS {}", quote_ident(column), quote_ident(&name)));
                    names.push(name.clone());
                    named.insert(column.clone(), name.clone());
                    if kind.is_some() {
                        columns.push(name.clone());
                        features.push(column.clone());
                    }
                }
                let condition: Vec<String> = key
                    .referenced
                    .iter()
                    .zip(&key.columns)
                    .map(|(r, c)| format!("{alias}.{} = {}.{}", quote_ident(r), parent.alias, quote_ident(c)))
                    .collect();
                from.push(format!("LEFT JOIN {} {alias} ON {}", table.relation, condition.join(" AND ")));
                let key_searched = key_feature;
                plan.kept.push(Join {
                    table: key.table.clone(),
                    prefix: prefix.clone(),
                    on,
                    referenced: key.referenced.clone(),
                    hop,
                    tuple_ratio: ratio,
                    columns,
                    key_searched,
                });
                next.push(From { table, alias, prefix: Some(prefix), features, named });
            }
        }
        frontier = next;
    }
    plan.query = format!("(SELECT {} FROM {})", select.join(", "), from.join(" "));
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(name: &str, rows: u64, columns: &[(&str, Option<bool>)], keys: Vec<ForeignKey>) -> Table {
        Table {
            relation: format!("\"nyc\".\"{name}\""),
            name: name.into(),
            rows,
            columns: columns.iter().map(|(c, k)| (c.to_string(), *k)).collect(),
            foreign_keys: keys,
            distinct: BTreeMap::new(),
            readable: true,
        }
    }

    fn key(columns: &[&str], table: &str, referenced: &[&str]) -> ForeignKey {
        ForeignKey {
            constraint: format!("{}_fk", columns.join("_")),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            table: format!("\"nyc\".\"{table}\""),
            referenced: referenced.iter().map(|c| c.to_string()).collect(),
        }
    }

    /// nycflights13 as issue 17 declares it: flights → planes, airlines,
    /// airports twice (origin, dest), weather on origin and hour.
    fn flights() -> Schema {
        let mut source = table(
            "flights",
            336_776,
            &[
                ("flight_id", Some(false)),
                ("late", Some(true)),
                ("carrier", Some(true)),
                ("tailnum", Some(true)),
                ("origin", Some(true)),
                ("dest", Some(true)),
                ("distance", Some(false)),
                ("time_hour", None),
            ],
            vec![
                key(&["carrier"], "airlines", &["carrier"]),
                key(&["tailnum"], "planes", &["tailnum"]),
                key(&["origin"], "airports", &["faa"]),
                key(&["dest"], "airports", &["faa"]),
                key(&["origin", "time_hour"], "weather", &["origin", "time_hour"]),
            ],
        );
        source.distinct = [("carrier", 16), ("tailnum", 4_043), ("origin", 3), ("dest", 105)]
            .into_iter()
            .map(|(c, n)| (c.to_string(), n))
            .collect();
        let tables = [
            table("airlines", 16, &[("carrier", Some(true)), ("name", Some(true))], vec![]),
            table(
                "planes",
                3_322,
                &[("tailnum", Some(true)), ("year", Some(false)), ("manufacturer", Some(true))],
                vec![],
            ),
            table("airports", 1_458, &[("faa", Some(true)), ("lat", Some(false)), ("tzone", Some(true))], vec![]),
            table(
                "weather",
                26_115,
                &[("origin", Some(true)), ("temp", Some(false)), ("wind_speed", Some(false)), ("time_hour", None)],
                vec![],
            ),
        ];
        Schema { source, tables: tables.into_iter().map(|t| (t.relation.clone(), t)).collect() }
    }

    fn features(schema: &Schema) -> Vec<String> {
        let s = &schema.source;
        s.columns
            .iter()
            .filter(|(c, k)| k.is_some() && c != "late" && c != "flight_id")
            .map(|(c, _)| c.clone())
            .collect()
    }

    #[test]
    fn small_tables_behind_a_categorical_key_are_pruned_and_composite_keys_kept() {
        let schema = flights();
        let plan = plan(&schema, 1, &features(&schema), 1000).unwrap();
        let kept: Vec<&str> = plan.kept.iter().map(|j| j.prefix.as_str()).collect();
        // tailnum has 4,043 values, more than the 1,000 categories kept:
        // the planes' columns say what the rarer tails cannot.
        assert_eq!(kept, ["planes", "weather"]);
        let pruned: Vec<(&str, &[String])> = plan.pruned.iter().map(|p| (p.table.as_str(), p.on.as_slice())).collect();
        assert_eq!(
            pruned,
            [
                ("\"nyc\".\"airlines\"", &["carrier".to_string()][..]),
                ("\"nyc\".\"airports\"", &["origin".to_string()][..]),
                ("\"nyc\".\"airports\"", &["dest".to_string()][..]),
            ]
        );
        assert_eq!(plan.pruned[0].tuple_ratio, Some(21048.5));
        assert!(plan.pruned[2].why.contains("\"dest\" (its 105 values each a category)"), "{}", plan.pruned[2].why);
        let weather = &plan.kept[1];
        assert_eq!(weather.on, ["origin", "time_hour"]);
        // The key's own columns are not repeated; columns of a type
        // Cerebro cannot use are read but are not features.
        assert_eq!(weather.columns, ["weather__temp", "weather__wind_speed"]);
        assert_eq!(
            plan.query,
            "(SELECT s.*, j1.\"year\" AS \"planes__year\", j1.\"manufacturer\" AS \"planes__manufacturer\", \
             j2.\"temp\" AS \"weather__temp\", j2.\"wind_speed\" AS \"weather__wind_speed\" \
             FROM \"nyc\".\"flights\" s \
             LEFT JOIN \"nyc\".\"planes\" j1 ON j1.\"tailnum\" = s.\"tailnum\" \
             LEFT JOIN \"nyc\".\"weather\" j2 ON j2.\"origin\" = s.\"origin\" AND j2.\"time_hour\" = s.\"time_hour\")"
        );
        // Another source of the same shape is read through the same joins.
        assert_eq!(plan.query_over(&schema.source.relation).as_deref(), Some(plan.query.as_str()));
        let stored: JoinPlan = serde_json::from_value(serde_json::to_value(&plan).unwrap()).unwrap();
        assert_eq!(
            stored.query_over("(SELECT * FROM nyc.new_flights)").unwrap(),
            plan.query.replace("\"nyc\".\"flights\" s", "(SELECT * FROM nyc.new_flights) s")
        );
        // A plan stored before joins recorded their referenced columns.
        let mut old = stored;
        old.kept[0].referenced.clear();
        assert_eq!(old.query_over("nyc.new_flights"), None);
        assert_eq!(
            plan.features_text(),
            [
                "planes.{planes__year, planes__manufacturer}, -planes.{planes__year, planes__manufacturer}?, -tailnum?",
                "weather.{weather__temp, weather__wind_speed}, -weather.{weather__temp, weather__wind_speed}?",
            ]
        );
    }

    #[test]
    fn joined_names_are_ones_the_language_can_write_and_tell_apart() {
        // A table named with a space, and two tables named alike in two
        // schemas, each behind a numeric key (so kept).
        let source = table(
            "facts",
            10_000,
            &[("id", Some(false)), ("a", Some(false)), ("b", Some(false)), ("School Code", Some(false))],
            vec![
                key(&["a"], "dim", &["id"]),
                key(&["b"], "dim", &["id"]),
                key(&["School Code"], "School Dim", &["id"]),
            ],
        );
        let mut other = table("dim", 10, &[("id", Some(false)), ("v", Some(false))], vec![]);
        other.relation = "\"other\".\"dim\"".into();
        let mut schema = Schema {
            source,
            tables: [
                table("dim", 10, &[("id", Some(false)), ("v", Some(false))], vec![]),
                table("School Dim", 10, &[("id", Some(false)), ("size", Some(false))], vec![]),
            ]
            .into_iter()
            .map(|t| (t.relation.clone(), t))
            .collect(),
        };
        schema.source.foreign_keys[1].table = other.relation.clone();
        schema.tables.insert(other.relation.clone(), other);
        let features: Vec<String> = ["a", "b", "School Code"].map(String::from).to_vec();
        let plan = plan(&schema, 1, &features, 1000).unwrap();
        let prefixes: Vec<&str> = plan.kept.iter().map(|j| j.prefix.as_str()).collect();
        assert_eq!(prefixes, ["a", "b", "School_Dim"]);
        for text in plan.features_text() {
            let spec = format!("features {text}");
            crate::mst::parse(&spec).unwrap_or_else(|e| panic!("{spec}: {e}"));
        }
    }

    #[test]
    fn a_key_that_is_not_a_categorical_feature_keeps_its_join() {
        let schema = flights();
        // Without dest among the features, nothing stands in for airports.
        let without: Vec<String> = features(&schema).into_iter().filter(|c| c != "dest").collect();
        let plan = plan(&schema, 1, &without, 1000).unwrap();
        let dest = plan.kept.iter().find(|j| j.on == ["dest"]).expect("the dest join is kept");
        // Two keys reference airports: each join is named by its key.
        assert_eq!(dest.prefix, "dest");
        // A key that is not a feature is not searched without itself.
        assert!(!dest.key_searched);
        assert_eq!(dest.columns, ["dest__lat", "dest__tzone"]);
        // Fewer categories kept than carriers: the airlines join is kept.
        let narrow = super::plan(&schema, 1, &features(&schema), 10).unwrap();
        assert!(narrow.kept.iter().any(|j| j.prefix == "airlines"));
        assert!(narrow.pruned.iter().all(|p| p.table != "\"nyc\".\"airlines\""));
        // A numeric key is encoded as a number, not one category per row.
        let mut numeric = flights();
        numeric.source.columns.iter_mut().filter(|(c, _)| c == "carrier").for_each(|(_, k)| *k = Some(false));
        let plan = super::plan(&numeric, 1, &features(&numeric), 1000).unwrap();
        assert!(plan.kept.iter().any(|j| j.prefix == "airlines"));
    }

    #[test]
    fn two_hops_follow_the_joined_tables_keys_and_unreadable_tables_are_said() {
        let mut schema = flights();
        let planes = schema.tables.get_mut("\"nyc\".\"planes\"").unwrap();
        planes.columns.push(("maker_id".into(), Some(false)));
        planes.foreign_keys.push(key(&["maker_id"], "makers", &["id"]));
        let makers = table("makers", 40, &[("id", Some(false)), ("country", Some(true))], vec![]);
        schema.tables.insert(makers.relation.clone(), makers);
        let one = plan(&schema, 1, &features(&schema), 1000).unwrap();
        assert!(one.kept.iter().all(|j| j.hop == 1));
        let two = plan(&schema, 2, &features(&schema), 1000).unwrap();
        let makers = two.kept.iter().find(|j| j.hop == 2).expect("a second hop");
        assert_eq!(makers.prefix, "planes__makers");
        assert_eq!(makers.on, ["planes__maker_id"]);
        assert_eq!(makers.columns, ["planes__makers__country"]);
        assert!(
            two.query.ends_with("LEFT JOIN \"nyc\".\"makers\" j3 ON j3.\"id\" = j1.\"maker_id\")"),
            "{}",
            two.query
        );
        assert_eq!(two.query_over(&schema.source.relation).as_deref(), Some(two.query.as_str()));
        // A row scored alone reads only the joins its columns come through:
        // the makers' country through the planes, not the weather.
        let reading = two.reading(&["planes__makers__country"]);
        let prefixes: Vec<&str> = reading.kept.iter().map(|j| j.prefix.as_str()).collect();
        assert_eq!(prefixes, ["planes", "planes__makers"]);
        let query = reading.query_over("s0").unwrap();
        assert!(query.contains("LEFT JOIN \"nyc\".\"makers\" j2 ON j2.\"id\" = j1.\"maker_id\""), "{query}");
        assert!(!query.contains("weather"), "{query}");
        let weather: Vec<String> = two.reading(&["weather__temp"]).kept.into_iter().map(|j| j.prefix).collect();
        assert_eq!(weather, ["weather"]);

        schema.tables.get_mut("\"nyc\".\"weather\"").unwrap().readable = false;
        let plan = plan(&schema, 1, &features(&schema), 1000).unwrap();
        assert!(plan.kept.iter().all(|j| j.prefix != "weather"));
        assert!(plan.pruned.iter().any(|p| p.on == ["origin", "time_hour"] && p.why == "you may not read it"));
    }

    #[test]
    fn names_too_long_or_taken_are_errors() {
        let mut schema = flights();
        schema.source.columns.push(("planes__year".into(), Some(false)));
        assert!(
            matches!(plan(&schema, 1, &[], 1000), Err(JoinsError::NameTaken { name, .. }) if name == "planes__year")
        );
        let mut schema = flights();
        schema.tables.get_mut("\"nyc\".\"planes\"").unwrap().columns.push(("y".repeat(60), Some(false)));
        assert!(matches!(plan(&schema, 1, &[], 1000), Err(JoinsError::NameTooLong { .. })));
    }
}
