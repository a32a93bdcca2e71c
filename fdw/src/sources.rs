//! Sources: the relation or query a model reads, resolved as the user who
//! reads it, with each column's type reduced to what Cerebro may safely do
//! with it.
//!
//! A source is a relation (stored schema-qualified, so it means the same
//! relation whoever reads it and whatever their `search_path`) or one SELECT
//! in parentheses. A column's value is read through `cerebro_shared::sql`'s
//! conversions, which never run a cast a user created; a snapshot stores each
//! column as its built-in base type (or as text, for an enum).
//!
//! Code in a source (a query's functions, a view's, a table's row-level
//! security policies, operators and casts it picks) runs with the rights of
//! whoever reads it. So a model's own source is read by default only when
//! every function it reaches belongs to a role that already has the
//! reader's rights (`foreign_code`, on the analysed and rewritten query);
//! otherwise the reader names the rows to score themselves (docs/sql.md,
//! "Security").

use std::ffi::CStr;

use cerebro_shared::spec::SqlKind;
use cerebro_shared::sql::{as_float8, as_output_text, as_text, quote_ident};
use pgrx::spi::SpiClient;
use pgrx::{pg_guard, pg_sys};

use crate::error::{CerebroError, Result};
use crate::identity;

pub(crate) struct SourceColumn {
    pub(crate) name: String,
    /// As the user declared it (a domain, a typmod), for messages.
    pub(crate) type_name: String,
    pub(crate) kind: Option<SqlKind>,
    pub(crate) readable: bool,
    pub(crate) base: BaseType,
}

/// A column's base type (through every level of domains), as far as
/// reading it safely goes.
pub(crate) enum BaseType {
    /// Built in (schema-qualified name): its casts are PostgreSQL's own.
    BuiltIn(String),
    /// An enum (schema-qualified, quoted): whoever owns it may have given it
    /// casts, so it becomes text through its output function.
    Enum(String),
    /// Anything else a role or an extension made (a composite, a range, an
    /// extension's type): text through its output function.
    Other,
}

impl SourceColumn {
    /// The built-in type a snapshot stores it as.
    pub(crate) fn storage(&self) -> &str {
        match &self.base {
            BaseType::BuiltIn(t) => t,
            BaseType::Enum(_) | BaseType::Other => "pg_catalog.text",
        }
    }

    /// The column as its snapshot stores it; run as the user who freezes it.
    pub(crate) fn stored(&self) -> String {
        match &self.base {
            BaseType::BuiltIn(t) => format!("({})::{t}", quote_ident(&self.name)),
            _ => self.text(),
        }
    }

    /// The column as text (a categorical feature, a key).
    pub(crate) fn text(&self) -> String {
        let column = quote_ident(&self.name);
        match &self.base {
            BaseType::BuiltIn(_) => as_text(&column, None),
            BaseType::Enum(t) => as_text(&column, Some(t)),
            BaseType::Other => as_output_text(&column),
        }
    }

    /// The column as float8 (a numeric feature).
    pub(crate) fn float8(&self) -> String {
        as_float8(&quote_ident(&self.name))
    }
}

pub(crate) struct Source {
    /// `"schema"."relation"`, or `(SELECT ...)` for a query.
    pub(crate) display: String,
    pub(crate) columns: Vec<SourceColumn>,
}

impl Source {
    pub(crate) fn column(&self, name: &str) -> Result<&SourceColumn> {
        self.columns
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| CerebroError::UnknownColumn { relation: self.display.clone(), column: name.to_owned() })
    }

    /// How the source appears in FROM: a relation as is, a query with an alias.
    pub(crate) fn in_from(&self) -> String {
        from_item(&self.display)
    }
}

/// The query a source names, when it is one: `(SELECT ...)`.
pub(crate) fn source_query(source: &str) -> Option<&str> {
    let t = source.trim();
    (t.len() >= 2 && t.starts_with('(') && t.ends_with(')')).then(|| t[1..t.len() - 1].trim())
}

/// How a source appears in FROM: a relation as is, a query with an alias.
pub(crate) fn from_item(display: &str) -> String {
    match source_query(display) {
        Some(_) => format!("{display} AS source"),
        None => display.to_owned(),
    }
}

/// Refuses anything but one SELECT (or VALUES, or WITH ... SELECT): the
/// text is run inside Cerebro's own statements.
pub(crate) fn check_single_select(query: &str) -> Result<()> {
    let text = std::ffi::CString::new(query).map_err(|_| CerebroError::QuerySource("it contains a NUL byte"))?;
    // SAFETY: raw_parser reads the NUL-terminated string and returns a List
    // of RawStmt (or raises a syntax error, which pgrx turns into an ERROR).
    unsafe {
        let list = pg_sys::raw_parser(text.as_ptr(), pg_sys::RawParseMode::RAW_PARSE_DEFAULT);
        if list.is_null() || (*list).length != 1 {
            return Err(CerebroError::QuerySource("it must be exactly one SELECT statement"));
        }
        let raw = (*(*list).elements).ptr_value as *mut pg_sys::RawStmt;
        if (*(*raw).stmt).type_ != pg_sys::NodeTag::T_SelectStmt {
            return Err(CerebroError::QuerySource("it must be a SELECT statement"));
        }
    }
    Ok(())
}

/// A palloc'd C string, copied.
fn owned(text: *mut std::ffi::c_char) -> String {
    // SAFETY: the lsyscache/format_type functions below return a valid
    // NUL-terminated palloc'd string, freed with the memory context.
    unsafe { CStr::from_ptr(text).to_string_lossy().into_owned() }
}

/// `(name, type oid, type as written, readable)` rows as source columns.
/// Each type is reduced to its base type (through every level of domains)
/// and classified by what Cerebro can use it as.
fn describe(client: &SpiClient<'_>, rows: Vec<(String, pg_sys::Oid, String, bool)>) -> Result<Vec<SourceColumn>> {
    // SAFETY: getBaseType follows typbasetype through the syscache.
    let bases: Vec<pg_sys::Oid> = rows.iter().map(|r| unsafe { pg_sys::getBaseType(r.1) }).collect();
    let oids: Vec<i64> = bases.iter().map(|o| i64::from(o.to_u32())).collect();
    let _path = identity::pin_search_path();
    let described = client.select(
        "SELECT t.typname::text, t.typcategory::text, t.typtype::text
         FROM unnest($1::bigint[]) WITH ORDINALITY AS c(type_oid, n)
         JOIN pg_catalog.pg_type t ON t.oid = c.type_oid::oid
         ORDER BY c.n",
        None,
        &[oids.into()],
    )?;
    let mut columns = Vec::with_capacity(rows.len());
    for ((row, base), (name, _, type_name, readable)) in described.into_iter().zip(&bases).zip(rows) {
        let typname: String = row.get(1)?.unwrap_or_default();
        let category: String = row.get(2)?.unwrap_or_default();
        let typtype: String = row.get(3)?.unwrap_or_default();
        // SAFETY: a syscache lookup of an existing type; the name comes back
        // schema-qualified and quoted where needed.
        let qualified = || owned(unsafe { pg_sys::format_type_be_qualified(*base) });
        let base = if base.to_u32() < pg_sys::FirstNormalObjectId {
            BaseType::BuiltIn(qualified())
        } else if typtype == "e" {
            BaseType::Enum(qualified())
        } else {
            BaseType::Other
        };
        columns.push(SourceColumn {
            name,
            type_name,
            kind: category.chars().next().and_then(|c| SqlKind::classify(c, &typname)),
            readable,
            base,
        });
    }
    Ok(columns)
}

/// A query source's columns, as the user running it sees them (the probe
/// runs as the user, so their privileges on every table it reads apply).
fn resolve_query(client: &SpiClient<'_>, query: &str) -> Result<Source> {
    check_single_select(query)?;
    let display = format!("({query})");
    let probe = client.select(&format!("SELECT * FROM {} LIMIT 0", from_item(&display)), None, &[])?;
    let mut rows: Vec<(String, pg_sys::Oid, String, bool)> = Vec::new();
    for i in 1..=probe.columns()? {
        let name = probe.column_name(i)?;
        if rows.iter().any(|(n, ..)| *n == name) {
            return Err(CerebroError::QuerySource("two of its columns have the same name; name them apart with AS"));
        }
        let oid = probe.column_type_oid(i)?.value();
        // SAFETY: a syscache lookup of the type the probe returned.
        let written = owned(unsafe { pg_sys::format_type_be(oid) });
        rows.push((name, oid, written, true));
    }
    Ok(Source { display, columns: describe(client, rows)? })
}

/// Resolves `name` (a relation the user names, in their `search_path`, or
/// a query in parentheses) as the calling user.
pub(crate) fn resolve_source(client: &SpiClient<'_>, name: &str) -> Result<Source> {
    if let Some(query) = source_query(name) {
        return resolve_query(client, query);
    }
    let oid = client
        .select("SELECT pg_catalog.to_regclass($1)::pg_catalog.oid", Some(1), &[name.into()])?
        .first()
        .get_one::<pg_sys::Oid>()?
        .ok_or_else(|| CerebroError::UnknownRelation(name.to_owned()))?;
    // Scoring reads the relation later in the statement: keep it from being
    // dropped, or replaced by a view of the same name, until then.
    // SAFETY: a lock on an existing relation, released at transaction end.
    unsafe { pg_sys::LockRelationOid(oid, pg_sys::AccessShareLock as pg_sys::LOCKMODE) };
    let _path = identity::pin_search_path();
    let rel = client.select(
        "SELECT c.relkind::text, pg_catalog.format('%I.%I', n.nspname, c.relname)
         FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
         WHERE c.oid = $1",
        Some(1),
        &[oid.into()],
    )?;
    let Some(row) = rel.into_iter().next() else {
        return Err(CerebroError::UnknownRelation(name.to_owned()));
    };
    let relkind: String = row.get(1)?.expect("relkind is not null");
    let display: String = row.get(2)?.expect("a name is not null");
    match relkind.as_str() {
        "r" | "m" | "f" | "p" | "v" => {}
        "S" => return Err(CerebroError::UnsupportedRelation { name: display, kind: "a sequence" }),
        "i" | "I" => return Err(CerebroError::UnsupportedRelation { name: display, kind: "an index" }),
        "c" => return Err(CerebroError::UnsupportedRelation { name: display, kind: "a composite type" }),
        _ => return Err(CerebroError::UnsupportedRelation { name: display, kind: "not a relation Cerebro can read" }),
    }
    let mut rows = Vec::new();
    for row in client.select(
        "SELECT a.attname::text, a.atttypid, pg_catalog.format_type(a.atttypid, a.atttypmod),
                pg_catalog.has_column_privilege($1, a.attnum, 'SELECT')
         FROM pg_catalog.pg_attribute a
         WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
         ORDER BY a.attnum",
        None,
        &[oid.into()],
    )? {
        rows.push((
            row.get::<String>(1)?.unwrap_or_default(),
            row.get::<pg_sys::Oid>(2)?.expect("atttypid is not null"),
            row.get::<String>(3)?.unwrap_or_default(),
            row.get::<bool>(4)?.unwrap_or(false),
        ));
    }
    Ok(Source { display, columns: describe(client, rows)? })
}

/// Code that reading a source would run with the reader's rights, owned
/// by a role that does not have them: "function mallory.spy()" and its owner.
pub(crate) struct ForeignCode {
    pub(crate) code: String,
    pub(crate) owner: String,
}

/// What a query reaches: every function its expressions call (operators'
/// and casts' too) and every domain whose checks it runs.
#[derive(Default)]
struct Reached {
    functions: Vec<pg_sys::Oid>,
    domains: Vec<pg_sys::Oid>,
}

#[pg_guard]
unsafe extern "C-unwind" fn note_function(function: pg_sys::Oid, context: *mut std::ffi::c_void) -> bool {
    // SAFETY: `context` is the &mut Reached that reached_by passes down.
    let reached = unsafe { &mut *(context as *mut Reached) };
    reached.functions.push(function);
    false
}

/// A tree walker over an analysed query, as PostgreSQL's own
/// contain_*_functions walkers are written: every node's functions, then
/// its children; a subquery (a view, once rewritten, is one) through
/// query_tree_walker, which also visits row-level security quals and, with
/// QTW_EXAMINE_SORTGROUP, the ORDER BY / GROUP BY / DISTINCT / window
/// clauses whose operators a query may choose (`ORDER BY x USING ~<~`).
#[pg_guard]
unsafe extern "C-unwind" fn walk(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
    if node.is_null() {
        return false;
    }
    // SAFETY: `node` is a valid node of the tree being walked; `context` is
    // the &mut Reached that reached_by passes down.
    unsafe {
        match (*node).type_ {
            pg_sys::NodeTag::T_Query => {
                return pg_sys::query_tree_walker(
                    node.cast(),
                    Some(walk),
                    context,
                    pg_sys::QTW_EXAMINE_SORTGROUP as i32,
                );
            }
            pg_sys::NodeTag::T_SortGroupClause => {
                let clause = node as *mut pg_sys::SortGroupClause;
                let reached = &mut *(context as *mut Reached);
                for op in [(*clause).eqop, (*clause).sortop] {
                    if op != pg_sys::Oid::INVALID {
                        reached.functions.push(pg_sys::get_opcode(op));
                    }
                }
                return false;
            }
            pg_sys::NodeTag::T_CoerceToDomain => {
                let coerce = node as *mut pg_sys::CoerceToDomain;
                (*(context as *mut Reached)).domains.push((*coerce).resulttype);
            }
            _ => {}
        }
        pg_sys::check_functions_in_node(node, Some(note_function), context);
        pg_sys::expression_tree_walker(node, Some(walk), context)
    }
}

/// What `sql` reaches once parsed, analysed and rewritten as the calling
/// role (views expanded, its row-level security policies added): nothing is
/// planned or run.
fn reached_by(sql: &str) -> Result<Reached> {
    let text = std::ffi::CString::new(sql).map_err(|_| CerebroError::QuerySource("it contains a NUL byte"))?;
    let mut reached = Reached::default();
    // SAFETY: parse analysis of a NUL-terminated string; errors are raised as
    // ERRORs (pgrx turns them into panics at this boundary); every list and
    // node is palloc'd in the current memory context and only read here.
    unsafe {
        let raw = pg_sys::pg_parse_query(text.as_ptr());
        // An empty list (NIL) is a null pointer.
        let length = |list: *mut pg_sys::List| if list.is_null() { 0 } else { (*list).length as usize };
        for r in 0..length(raw) {
            let stmt = (*(*raw).elements.add(r)).ptr_value as *mut pg_sys::RawStmt;
            let queries = pg_sys::pg_analyze_and_rewrite_fixedparams(
                stmt,
                text.as_ptr(),
                std::ptr::null(),
                0,
                std::ptr::null_mut(),
            );
            for q in 0..length(queries) {
                let query = (*(*queries).elements.add(q)).ptr_value as *mut pg_sys::Node;
                walk(query, (&mut reached as *mut Reached).cast());
            }
        }
    }
    Ok(reached)
}

/// The first code `SELECT * FROM <from>` would run that belongs to a role
/// without every right the calling role has: a function (of an operator, a
/// cast, a view, a row-level security policy, the query itself) or a
/// domain's checks. Code of the calling role itself, of a superuser or of a
/// role that has the caller's rights gains nothing by running as the caller.
pub(crate) fn foreign_code(client: &SpiClient<'_>, from: &str) -> Result<Option<ForeignCode>> {
    let reached = reached_by(&format!("SELECT * FROM {from}"))?;
    let reader = identity::current_role();
    let ids = |oids: &[pg_sys::Oid]| oids.iter().map(|o| i64::from(o.to_u32())).collect::<Vec<i64>>();
    let _path = identity::pin_search_path();
    let owners = client.select(
        "SELECT 'function ' || p.oid::pg_catalog.regprocedure::text, p.proowner
             FROM pg_catalog.pg_proc p WHERE p.oid = ANY ($1::bigint[]::oid[])
         UNION ALL
         SELECT 'domain ' || t.oid::pg_catalog.regtype::text, t.typowner
             FROM pg_catalog.pg_type t WHERE t.oid = ANY ($2::bigint[]::oid[])",
        None,
        &[ids(&reached.functions).into(), ids(&reached.domains).into()],
    )?;
    for row in owners {
        let code: String = row.get(1)?.unwrap_or_default();
        let owner: pg_sys::Oid = row.get(2)?.unwrap_or(pg_sys::Oid::INVALID);
        // SAFETY: a syscache-backed privilege test (true for a superuser owner).
        if owner == reader || unsafe { pg_sys::has_privs_of_role(owner, reader) } {
            continue;
        }
        // SAFETY: a syscache lookup; noerr gives NULL for a dropped role.
        let name = unsafe { pg_sys::GetUserNameFromId(owner, true) };
        let owner = if name.is_null() { format!("{}", owner.to_u32()) } else { owned(name) };
        return Ok(Some(ForeignCode { code, owner }));
    }
    Ok(None)
}

/// Refuses to read `model`'s own source (`display`) for the calling role
/// when that would run code a role without the caller's rights wrote
/// ([`foreign_code`]). Run before the source is resolved or probed: planning
/// a query may already run its functions (constant folding).
pub(crate) fn check_own_source(client: &SpiClient<'_>, model: &str, display: &str) -> Result<()> {
    match foreign_code(client, &from_item(display))? {
        None => Ok(()),
        Some(ForeignCode { code, owner }) => Err(CerebroError::ForeignSourceCode {
            model: model.to_owned(),
            code,
            owner,
            own_source: display.to_owned(),
        }),
    }
}
