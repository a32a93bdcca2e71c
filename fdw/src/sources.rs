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

use cerebro_shared::request::{self, source_query, Column, RequestError, SourceShape};
use cerebro_shared::spec::SqlKind;
use cerebro_shared::sql::{as_float8, as_output_text, as_text, quote_ident};
use pgrx::spi::SpiClient;
use pgrx::{pg_guard, pg_sys, PgOid};

use crate::error::{CerebroError, Result};
use crate::identity;
use crate::plans;

pub(crate) struct SourceColumn {
    pub(crate) name: String,
    /// As the user declared it (a domain, a typmod), for messages.
    pub(crate) type_name: String,
    pub(crate) kind: Option<SqlKind>,
    pub(crate) readable: bool,
    pub(crate) base: BaseType,
    /// Its type's oid, a domain's own.
    pub(crate) type_oid: pg_sys::Oid,
}

/// How a categorical feature's values read as text, the categories a model
/// learns: strings (any string type, an enum, any type not built in, each
/// read through its output function, as a snapshot freezes it), the
/// integer types (which write a value as the same text), or another
/// built-in type, only itself (`true` is not `1`, `2.0` as numeric is not
/// `2` as float8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TextFamily {
    Strings,
    Integers,
    Type(pg_sys::Oid),
}

impl TextFamily {
    /// Whether a column of this family can stand for one of `trained`'s:
    /// the same family, or strings, which hold whatever text the user
    /// wrote (`'true'` for a boolean, `payload->>'store_id'` for an id).
    pub(crate) fn can_stand_for(self, trained: TextFamily) -> bool {
        self == trained || self == TextFamily::Strings
    }
}

pub(crate) fn text_family(oid: pg_sys::Oid) -> TextFamily {
    // SAFETY: getBaseType follows typbasetype through the syscache.
    let base = unsafe { pg_sys::getBaseType(oid) };
    match base {
        pg_sys::INT2OID | pg_sys::INT4OID | pg_sys::INT8OID => TextFamily::Integers,
        pg_sys::TEXTOID | pg_sys::VARCHAROID | pg_sys::BPCHAROID | pg_sys::NAMEOID => TextFamily::Strings,
        _ if base.to_u32() >= pg_sys::FirstNormalObjectId => TextFamily::Strings,
        _ => TextFamily::Type(base),
    }
}

/// A column's base type (through every level of domains), as far as
/// reading it safely goes.
pub(crate) enum BaseType {
    /// Built in (schema-qualified name): its casts are PostgreSQL's own.
    BuiltIn { name: String, oid: pg_sys::Oid },
    /// An enum (schema-qualified, quoted): whoever owns it may have given it
    /// casts, so it becomes text through its output function.
    Enum(String),
    /// Anything else a role or an extension made (a composite, a range, an
    /// extension's type): text through its output function.
    Other,
}

impl BaseType {
    /// Whether values also compare in their own type, as an index does: a
    /// built-in type, not an array, with a default btree operator class.
    /// Asked of a key column only, when a scan or a selection needs it.
    pub(crate) fn ordered(&self) -> bool {
        let BaseType::BuiltIn { oid, .. } = self else { return false };
        // The type cache keeps the default btree operator family (found with
        // GetDefaultOpClass once, forgotten when operator classes change).
        // SAFETY: catalog lookups of an existing type; the type cache's
        // entries live as long as the backend.
        type_facts(*oid).category != 'A'
            && unsafe { (*pg_sys::lookup_type_cache(*oid, pg_sys::TYPECACHE_BTREE_OPFAMILY as i32)).btree_opf }
                != pg_sys::InvalidOid
    }
}

impl SourceColumn {
    /// The built-in type a snapshot stores it as.
    pub(crate) fn storage(&self) -> &str {
        match &self.base {
            BaseType::BuiltIn { name, .. } => name,
            BaseType::Enum(_) | BaseType::Other => "pg_catalog.text",
        }
    }

    /// The column as its snapshot stores it; run as the user who freezes it.
    pub(crate) fn stored(&self) -> String {
        match &self.base {
            BaseType::BuiltIn { name: t, .. } => format!("({})::{t}", quote_ident(&self.name)),
            _ => self.text(),
        }
    }

    /// The column as text (a categorical feature, a key).
    pub(crate) fn text(&self) -> String {
        let column = quote_ident(&self.name);
        match &self.base {
            BaseType::BuiltIn { .. } => as_text(&column, None),
            BaseType::Enum(t) => as_text(&column, Some(t)),
            BaseType::Other => as_output_text(&column),
        }
    }

    /// `column = ANY (keys)` for keys that `array` (a text[] expression)
    /// gives: compared in the column's own type when it is a built-in one
    /// with a btree order (integers, text, uuid, dates...), so that an index
    /// on the column finds them (a key that is not a value of that type is
    /// the type's own input error, as in any query); as text otherwise.
    pub(crate) fn equals_any(&self, array: &str) -> String {
        match &self.base {
            BaseType::BuiltIn { name: t, .. } if self.base.ordered() => {
                format!("{} OPERATOR(pg_catalog.=) ANY ({array}::{t}[])", self.stored())
            }
            _ => format!("{} OPERATOR(pg_catalog.=) ANY ({array})", self.text()),
        }
    }

    /// `column = key` for one key that `value` (a text expression) gives,
    /// compared as [`equals_any`](Self::equals_any) compares: a query of one
    /// key gets a generic plan PostgreSQL keeps, where `= ANY` of an array
    /// parameter is planned again at every call (its generic plan, costed
    /// for an array of unknown length, never looks cheaper).
    pub(crate) fn equals(&self, value: &str) -> String {
        match &self.base {
            BaseType::BuiltIn { name: t, .. } if self.base.ordered() => {
                format!("{} OPERATOR(pg_catalog.=) ({value})::{t}", self.stored())
            }
            _ => format!("{} OPERATOR(pg_catalog.=) ({value})", self.text()),
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
        self.columns.iter().find(|c| c.name == name).ok_or_else(|| {
            RequestError::UnknownColumn { relation: self.display.clone(), column: name.to_owned() }.into()
        })
    }

    /// The source as `cerebro_shared::request`'s rules see it, without the
    /// columns of tables a selection names (see [`read_shape`]).
    pub(crate) fn shape(&self) -> SourceShape {
        SourceShape {
            relation: self.display.clone(),
            columns: self
                .columns
                .iter()
                .map(|c| Column { name: c.name.clone(), type_name: c.type_name.clone(), kind: c.kind })
                .collect(),
            tables: Default::default(),
        }
    }

    /// How the source appears in FROM: a relation as is, a query with an alias.
    pub(crate) fn in_from(&self) -> String {
        from_item(&self.display)
    }
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

/// What `pg_type` says of a type that decides how Cerebro reads it.
struct TypeFacts {
    typname: String,
    /// `typcategory`: `N` numeric, `S` string, `A` array...
    category: char,
    /// `typtype`: `b` base, `e` enum, `c` composite...
    typtype: char,
}

/// [`TypeFacts`] of `oid`, from the syscache (blank for a type dropped
/// meanwhile, which then reads as nothing Cerebro can use).
fn type_facts(oid: pg_sys::Oid) -> TypeFacts {
    // SAFETY: a syscache lookup; the tuple is read, then released.
    unsafe {
        let tuple = pg_sys::SearchSysCache1(pg_sys::SysCacheIdentifier::TYPEOID as i32, pg_sys::Datum::from(oid));
        if tuple.is_null() {
            return TypeFacts { typname: String::new(), category: ' ', typtype: ' ' };
        }
        let form = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_type>(tuple);
        let facts = TypeFacts {
            typname: pgrx::name_data_to_str(&(*form).typname).to_owned(),
            category: (*form).typcategory as u8 as char,
            typtype: (*form).typtype as u8 as char,
        };
        pg_sys::ReleaseSysCache(tuple);
        facts
    }
}

/// `(name, type oid, type as written, readable)` rows as source columns.
/// Each type is reduced to its base type (through every level of domains)
/// and classified by what Cerebro can use it as.
fn describe(rows: Vec<(String, pg_sys::Oid, String, bool)>) -> Result<Vec<SourceColumn>> {
    // SAFETY: getBaseType follows typbasetype through the syscache.
    let bases: Vec<pg_sys::Oid> = rows.iter().map(|r| unsafe { pg_sys::getBaseType(r.1) }).collect();
    let mut columns = Vec::with_capacity(rows.len());
    for (base, (name, type_oid, type_name, readable)) in bases.iter().zip(rows) {
        let TypeFacts { typname, category, typtype } = type_facts(*base);
        // SAFETY: a syscache lookup of an existing type; the name comes back
        // schema-qualified and quoted where needed.
        let qualified = || owned(unsafe { pg_sys::format_type_be_qualified(*base) });
        let base = if base.to_u32() < pg_sys::FirstNormalObjectId {
            BaseType::BuiltIn { name: qualified(), oid: *base }
        } else if typtype == 'e' {
            BaseType::Enum(qualified())
        } else {
            BaseType::Other
        };
        columns.push(SourceColumn {
            name,
            type_name,
            kind: SqlKind::classify(category, &typname),
            readable,
            base,
            type_oid,
        });
    }
    Ok(columns)
}

/// A query source's columns, as the user running it sees them (the probe
/// runs as the user, so their privileges on every table it reads apply).
fn resolve_query(client: &SpiClient<'_>, query: &str) -> Result<Source> {
    check_single_select(query)?;
    // A `--` comment on the query's last line would swallow the closing
    // parenthesis: it ends on a line of its own then.
    let display = if query.rsplit('\n').next().is_some_and(|last| last.contains("--")) {
        format!("({query}\n)")
    } else {
        format!("({query})")
    };
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
    Ok(Source { display, columns: describe(rows)? })
}

/// An open relation's columns as `describe` takes them: `(name, type oid,
/// type as written, whether the current user may read it)`, in order,
/// without dropped ones. A column is readable with the table's SELECT
/// privilege or its own, as `has_column_privilege` says.
///
/// # Safety
/// `rel` is an open relation.
unsafe fn columns_of(rel: pg_sys::Relation) -> Vec<(String, pg_sys::Oid, String, bool)> {
    // SAFETY: as the caller promises; the privilege checks and type names
    // read the syscache.
    unsafe {
        let relid = (*rel).rd_id;
        let user = pg_sys::GetUserId();
        let whole_table = pg_sys::pg_class_aclcheck(relid, user, pg_sys::ACL_SELECT as pg_sys::AclMode)
            == pg_sys::AclResult::ACLCHECK_OK;
        let desc = (*rel).rd_att;
        let natts = (*desc).natts as usize;
        (*desc)
            .attrs
            .as_slice(natts)
            .iter()
            .filter(|a| !a.attisdropped)
            .map(|a| {
                let readable = whole_table
                    || pg_sys::pg_attribute_aclcheck(relid, a.attnum, user, pg_sys::ACL_SELECT as pg_sys::AclMode)
                        == pg_sys::AclResult::ACLCHECK_OK;
                (
                    pgrx::name_data_to_str(&a.attname).to_owned(),
                    a.atttypid,
                    owned(pg_sys::format_type_with_typemod(a.atttypid, a.atttypmod)),
                    readable,
                )
            })
            .collect()
    }
}

/// Resolves `name` (a relation the user names, in their `search_path`, or
/// a query in parentheses) as the calling user.
pub(crate) fn resolve_source(client: &SpiClient<'_>, name: &str) -> Result<Source> {
    if let Some(query) = source_query(name) {
        return resolve_query(client, query);
    }
    // The name resolves in the user's search_path, as `to_regclass` does,
    // and the relation is locked as it resolves (RangeVarGetRelidExtended
    // looks again if it changed while the lock was awaited): scoring reads
    // it later in the statement, so it cannot be dropped, or replaced by a
    // view of the same name, until then. What it is and which of its
    // columns the user may read come from the relation cache and the
    // syscache, as PostgreSQL's own checks read them: no catalog query per
    // call. Types are named as with the search path pinned, as every
    // message names them.
    if request::unparenthesised_query(name) {
        return Err(CerebroError::QuerySource("a query is a source when written in parentheses: (SELECT ...)"));
    }
    if name.trim_start().starts_with('(') {
        return Err(CerebroError::QuerySource(
            "a query source is one SELECT in parentheses with nothing after them: no alias, no semicolon",
        ));
    }
    let unknown = || CerebroError::UnknownRelation(name.to_owned());
    if name.trim().is_empty() {
        return Err(unknown());
    }
    let written = std::ffi::CString::new(name).map_err(|_| unknown())?;
    // SAFETY: parses a NUL-terminated name (a syntax error is PostgreSQL's
    // ERROR, as in to_regclass) and looks it up, locking what it finds
    // until the transaction ends.
    let oid = unsafe {
        let relation = pg_sys::makeRangeVarFromNameList(pg_sys::stringToQualifiedNameList(written.as_ptr()));
        pg_sys::RangeVarGetRelidExtended(
            relation,
            pg_sys::AccessShareLock as pg_sys::LOCKMODE,
            pg_sys::RVROption::RVR_MISSING_OK,
            None,
            std::ptr::null_mut(),
        )
    };
    if oid == pg_sys::InvalidOid {
        return Err(unknown());
    }
    let _path = identity::pin_search_path();
    // SAFETY: opens the relation locked above (NULL if it was dropped
    // before the lock was taken); its descriptor is read while it is open.
    let (display, rows) = unsafe {
        let rel = pg_sys::try_relation_open(oid, pg_sys::NoLock as pg_sys::LOCKMODE);
        if rel.is_null() {
            return Err(unknown());
        }
        let form = &*(*rel).rd_rel;
        let display = owned(pg_sys::quote_qualified_identifier(
            pg_sys::get_namespace_name(form.relnamespace),
            form.relname.data.as_ptr(),
        ));
        let relkind = form.relkind as u8;
        let rows = match relkind {
            b'r' | b'm' | b'f' | b'p' | b'v' => Ok(columns_of(rel)),
            b'S' => Err("a sequence"),
            b'i' | b'I' => Err("an index"),
            b'c' => Err("a composite type"),
            _ => Err("not a relation Cerebro can read"),
        };
        pg_sys::relation_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        match rows {
            Ok(rows) => (display, rows),
            Err(kind) => return Err(CerebroError::UnsupportedRelation { name: display, kind }),
        }
    };
    Ok(Source { display, columns: describe(rows)? })
}

/// What `cerebro_shared::request`'s rules need of `source`, resolved as
/// the calling user: its columns and, for a query, those of each table in
/// `tables` (named whole by a selection, `t.*`).
pub(crate) fn read_shape(client: &SpiClient<'_>, source: &str, tables: &[String]) -> Result<SourceShape> {
    let mut shape = resolve_source(client, source)?.shape();
    for table in tables {
        let columns = resolve_source(client, table)?.columns.into_iter().map(|c| c.name).collect();
        shape.tables.insert(table.clone(), columns);
    }
    Ok(shape)
}

/// Code that reading a source would run with the reader's rights, owned
/// by a role that does not have them: "function mallory.spy()" and its owner.
pub(crate) struct ForeignCode {
    pub(crate) code: String,
    pub(crate) owner: String,
}

/// What a query reaches: every function its expressions call (casts' and
/// type I/O's too), every operator it applies (whose negator or commutator
/// the planner may put in its place), every domain whose checks it runs, and
/// every relation it reads, views' placeholders included, with whether
/// row-level security policies were added to the read.
#[derive(Default)]
struct Reached {
    functions: Vec<pg_sys::Oid>,
    operators: Vec<pg_sys::Oid>,
    domains: Vec<pg_sys::Oid>,
    relations: Vec<(pg_sys::Oid, bool)>,
}

#[pg_guard]
unsafe extern "C-unwind" fn note_function(function: pg_sys::Oid, context: *mut std::ffi::c_void) -> bool {
    // SAFETY: `context` is the &mut Reached that reached_by passes down.
    let reached = unsafe { &mut *(context as *mut Reached) };
    reached.functions.push(function);
    false
}

/// How query_tree_walker is asked to walk every query, as PostgreSQL's own
/// contain_*_functions walkers do, plus: the range table entries themselves
/// (which relations, with which row-level security quals) and the ORDER BY /
/// GROUP BY / DISTINCT / window clauses, whose operators a query may choose
/// (`ORDER BY x USING ~<~`).
const WALK_FLAGS: i32 = (pg_sys::QTW_EXAMINE_RTES_BEFORE | pg_sys::QTW_EXAMINE_SORTGROUP) as i32;

/// A tree walker over an analysed and rewritten query: every node's
/// functions, then its children; a subquery (a view, once rewritten, is
/// one) through query_tree_walker, which also visits the row-level security
/// quals of each range table entry.
#[pg_guard]
unsafe extern "C-unwind" fn walk(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
    if node.is_null() {
        return false;
    }
    // SAFETY: `node` is a valid node of the tree being walked; `context` is
    // the &mut Reached that reached_by passes down.
    unsafe {
        pg_sys::check_stack_depth();
        let reached = &mut *(context as *mut Reached);
        match (*node).type_ {
            pg_sys::NodeTag::T_Query => {
                return pg_sys::query_tree_walker(node.cast(), Some(walk), context, WALK_FLAGS);
            }
            pg_sys::NodeTag::T_RangeTblEntry => {
                let rte = node as *mut pg_sys::RangeTblEntry;
                if (*rte).rtekind == pg_sys::RTEKind::RTE_RELATION {
                    reached.relations.push(((*rte).relid, !(*rte).securityQuals.is_null()));
                }
                // query_tree_walker goes on into the entry's contents.
                return false;
            }
            pg_sys::NodeTag::T_SortGroupClause => {
                let clause = node as *mut pg_sys::SortGroupClause;
                for op in [(*clause).eqop, (*clause).sortop] {
                    if op != pg_sys::Oid::INVALID {
                        reached.operators.push(op);
                        reached.functions.push(pg_sys::get_opcode(op));
                    }
                }
                return false;
            }
            // The same layout: DistinctExpr and NullIfExpr are OpExprs.
            pg_sys::NodeTag::T_OpExpr | pg_sys::NodeTag::T_DistinctExpr | pg_sys::NodeTag::T_NullIfExpr => {
                reached.operators.push((*(node as *mut pg_sys::OpExpr)).opno);
            }
            pg_sys::NodeTag::T_ScalarArrayOpExpr => {
                reached.operators.push((*(node as *mut pg_sys::ScalarArrayOpExpr)).opno);
            }
            pg_sys::NodeTag::T_CoerceToDomain => {
                reached.domains.push((*(node as *mut pg_sys::CoerceToDomain)).resulttype);
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

/// Whether code `owner` wrote may run with `reader`'s rights: it gains
/// nothing by it when the owner is the reader, a superuser, or has the
/// reader's privileges anyway.
fn trusted_by(owner: pg_sys::Oid, reader: pg_sys::Oid) -> bool {
    // SAFETY: a syscache-backed privilege test (true for a superuser owner).
    owner == reader || unsafe { pg_sys::has_privs_of_role(owner, reader) }
}

fn role_name(role: pg_sys::Oid) -> String {
    // SAFETY: a syscache lookup; noerr gives NULL for a dropped role.
    let name = unsafe { pg_sys::GetUserNameFromId(role, true) };
    if name.is_null() {
        role.to_u32().to_string()
    } else {
        owned(name)
    }
}

/// The first code `SELECT * FROM <from>` would run with the calling role's
/// rights that belongs to a role without them. SQL text runs with its
/// reader's rights, and builtins run any SQL or change any setting given to
/// them (`query_to_xml`, `set_config`, `pg_read_file` for a superuser), so
/// every text the read goes through must be written by a role the reader
/// trusts: each view's (its owner's), each table's row-level security
/// policies applied to the reader (the table owner's); and every function,
/// operator (with its negator and commutator, which the planner may use
/// instead) and domain reached must be owned by one. Nothing is planned or
/// run to find out.
pub(crate) fn foreign_code(client: &SpiClient<'_>, from: &str) -> Result<Option<ForeignCode>> {
    let reached = reached_by(&format!("SELECT * FROM {from}"))?;
    let reader = identity::current_role();
    let ids = |oids: &mut dyn Iterator<Item = pg_sys::Oid>| oids.map(|o| i64::from(o.to_u32())).collect::<Vec<i64>>();
    let views_and_policies: Vec<i64> = ids(&mut reached.relations.iter().map(|(r, _)| *r));
    let policed: Vec<bool> = reached.relations.iter().map(|(_, p)| *p).collect();
    let _path = identity::pin_search_path();
    let array = |oid| PgOid::from(oid);
    let owners = plans::select(
        client,
        "SELECT 'view ' || c.oid::pg_catalog.regclass::text, c.relowner
             FROM unnest($1::bigint[], $2::bool[]) AS r(relid, policed)
             JOIN pg_catalog.pg_class c ON c.oid = r.relid::oid WHERE c.relkind = 'v'
         UNION ALL
         SELECT 'the row-level security policies of ' || c.oid::pg_catalog.regclass::text, c.relowner
             FROM unnest($1::bigint[], $2::bool[]) AS r(relid, policed)
             JOIN pg_catalog.pg_class c ON c.oid = r.relid::oid WHERE r.policed
         UNION ALL
         SELECT 'function ' || p.oid::pg_catalog.regprocedure::text, p.proowner
             FROM pg_catalog.pg_proc p WHERE p.oid = ANY ($3::bigint[]::oid[])
         UNION ALL
         SELECT 'operator ' || o.oid::pg_catalog.regoperator::text, o.oprowner
             FROM pg_catalog.pg_operator o WHERE o.oid = ANY ($4::bigint[]::oid[])
         UNION ALL
         SELECT 'operator ' || n.oid::pg_catalog.regoperator::text || ' (planned for '
                    || o.oid::pg_catalog.regoperator::text || ')', owner
             FROM pg_catalog.pg_operator o
             JOIN pg_catalog.pg_operator n ON n.oid IN (o.oprnegate, o.oprcom)
             JOIN pg_catalog.pg_proc p ON p.oid = n.oprcode,
             LATERAL (VALUES (n.oprowner), (p.proowner)) AS w(owner)
             WHERE o.oid = ANY ($4::bigint[]::oid[])
         UNION ALL
         SELECT 'domain ' || t.oid::pg_catalog.regtype::text, t.typowner
             FROM pg_catalog.pg_type t WHERE t.oid = ANY ($5::bigint[]::oid[])",
        &[
            array(pg_sys::INT8ARRAYOID),
            array(pg_sys::BOOLARRAYOID),
            array(pg_sys::INT8ARRAYOID),
            array(pg_sys::INT8ARRAYOID),
            array(pg_sys::INT8ARRAYOID),
        ],
        None,
        &[
            views_and_policies.into(),
            policed.into(),
            ids(&mut reached.functions.iter().copied()).into(),
            ids(&mut reached.operators.iter().copied()).into(),
            ids(&mut reached.domains.iter().copied()).into(),
        ],
    )?;
    for row in owners {
        let owner: pg_sys::Oid = row.get(2)?.unwrap_or(pg_sys::Oid::INVALID);
        if !trusted_by(owner, reader) {
            let code: String = row.get(1)?.unwrap_or_default();
            return Ok(Some(ForeignCode { code, owner: role_name(owner) }));
        }
    }
    Ok(None)
}

/// Refuses to read `model`'s own source (`display`, a query written by
/// `author`, or a relation) for the calling role when that would run code
/// of a role without the caller's rights ([`foreign_code`]). A query's own
/// text is its author's code; it is checked before it is even parsed as
/// part of anything, since planning may already run its functions
/// (constant folding).
pub(crate) fn check_own_source(client: &SpiClient<'_>, model: &str, display: &str, author: &str) -> Result<()> {
    // A relation's verdict is kept for its reader until the catalog changes
    // (`invalidation`): a by-key query would otherwise analyse the source
    // and query the catalog again for every key. A query's text is checked
    // each time, since the reader's search_path decides what it names.
    let keepable = source_query(display).is_none();
    let kept = (display.to_owned(), author.to_owned(), identity::current_role());
    let changes = crate::invalidation::changes();
    if keepable && TRUSTED_SOURCES.with(|t| t.borrow().get(&kept) == Some(&changes)) {
        return Ok(());
    }
    check_own_source_now(client, model, display, author)?;
    if keepable {
        TRUSTED_SOURCES.with(|t| {
            let mut trusted = t.borrow_mut();
            if trusted.len() >= MAX_TRUSTED_SOURCES {
                trusted.clear();
            }
            trusted.insert(kept, changes);
        });
    }
    Ok(())
}

/// Most verdicts [`check_own_source`] keeps.
const MAX_TRUSTED_SOURCES: usize = 256;

thread_local! {
    /// Relations found to run no code of a role their reader does not
    /// trust, by (relation, model's author, reader): the count of catalog
    /// changes when it was found.
    static TRUSTED_SOURCES: std::cell::RefCell<std::collections::HashMap<(String, String, pg_sys::Oid), u64>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

fn check_own_source_now(client: &SpiClient<'_>, model: &str, display: &str, author: &str) -> Result<()> {
    let refuse = |code: String, owner: String| CerebroError::ForeignSourceCode {
        model: model.to_owned(),
        code,
        owner,
        own_source: display.to_owned(),
    };
    if source_query(display).is_some()
        && !crate::access::role_oid(author).is_some_and(|a| trusted_by(a, identity::current_role()))
    {
        return Err(refuse("a query".to_owned(), author.to_owned()));
    }
    match foreign_code(client, &from_item(display))? {
        None => Ok(()),
        Some(ForeignCode { code, owner }) => Err(refuse(code, owner)),
    }
}
