//! The scan half of the foreign data wrapper: how PostgreSQL plans and runs a
//! SELECT over `cerebro.models` and `cerebro.predictions`.
//!
//! supabase-wrappers 0.1.28 keeps a raw pointer to its planning state in the
//! plan (`fdw_private`) and frees that state when the first execution ends.
//! PostgreSQL caches plans — prepared statements after five executions (what
//! psycopg, JDBC, pgx and PostgREST do by themselves), PL/pgSQL, SQL functions
//! — and re-executes them, so the framework's scan ran through freed memory
//! and took the server down (upstream issues #56 and #482, fixed in 0.2.x,
//! which needs a newer Rust than ours). These callbacks replace the
//! framework's scan callbacks: a plan carries only node trees PostgreSQL
//! copies with it, and every execution builds its own state and frees it,
//! whether it ends or fails.
//!
//! - Planning finds the conditions Cerebro can use: `column = value` and
//!   `column = ANY (array)` on `model`, `version`, `source`, `key_column` or
//!   `key`, with a built-in equality and a value that needs no column of the
//!   scan (a constant, a parameter, an outer reference, a stable
//!   expression, or, in a scan parameterised by a join's other relations,
//!   their columns: `get_foreign_paths` offers such a scan for a join on
//!   the key or the model, which a nested loop rescans per outer row). Their attribute numbers go in `fdw_private` and their
//!   value expressions in `fdw_exprs`, which PostgreSQL prepares and keeps
//!   up to date like any other expression of the plan. Every condition stays
//!   a filter PostgreSQL checks too, so narrowing the scan never changes what
//!   a query returns; except a lone `model`, `source` or `key_column = text`,
//!   which every row the scan returns repeats (`echoes`): checking it again
//!   on each of a table's rows cost a tenth of a scoring backend's time.
//! - Execution evaluates those expressions when the scan begins (and again on
//!   rescan, when an outer row's parameter changes) and hands the values to
//!   the wrapper (`crate::fdw::CerebroFdw`, these callbacks' type parameter,
//!   so that this module does not import the one that installs it) as
//!   [`Qual`]s; a NULL value matches no row, so the scan returns none, as
//!   the unprepared query does.

use std::collections::HashMap;
use std::ffi::{c_void, CStr};
use std::ptr;

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::FromDatum;
use supabase_wrappers::prelude::{Cell, Column, ForeignDataWrapper, ForeignServer, Qual, Row, Value};

use crate::error::raise;
use crate::error::CerebroError;

/// Planner estimates: rough, so that a join hashes instead of rescanning a
/// scoring scan.
fn estimate(object: &str) -> (f64, i32) {
    match object {
        "models" => (100.0, 300),
        _ => (100_000.0, 64),
    }
}

/// What a plan tells its executions, kept in `fdw_private` as
/// `(pushed attnos, pushed-with-ANY flags, needed attnos, from-outside
/// flags)`: integer lists,
/// which `copyObject` copies with the plan.
struct PlanPrivate {
    /// Attribute numbers of the pushed conditions; `fdw_exprs` holds their
    /// values in the same order.
    pushed: Vec<i32>,
    /// Whether each pushed condition is `= ANY (array)`.
    any: Vec<bool>,
    /// The attributes the query reads; empty when it reads whole rows.
    needed: Vec<i32>,
    /// Whether each pushed value comes from other rows than the query
    /// names ([`comes_from_outside`]).
    outside: Vec<bool>,
}

impl PlanPrivate {
    unsafe fn to_list(&self) -> *mut pg_sys::List {
        unsafe fn ints(values: impl Iterator<Item = i32>) -> *mut pg_sys::List {
            let mut list = ptr::null_mut();
            for v in values {
                list = unsafe { pg_sys::lappend_int(list, v) };
            }
            list
        }
        unsafe {
            let pushed = ints(self.pushed.iter().copied());
            let any = ints(self.any.iter().map(|&a| a as i32));
            let needed = ints(self.needed.iter().copied());
            let outside = ints(self.outside.iter().map(|&o| o as i32));
            let mut list = pg_sys::lappend(ptr::null_mut(), pushed.cast());
            list = pg_sys::lappend(list, any.cast());
            list = pg_sys::lappend(list, needed.cast());
            pg_sys::lappend(list, outside.cast())
        }
    }

    unsafe fn from_list(list: *mut pg_sys::List) -> PlanPrivate {
        unsafe fn ints(list: *mut pg_sys::List) -> Vec<i32> {
            if list.is_null() {
                return Vec::new();
            }
            let cells = unsafe { std::slice::from_raw_parts((*list).elements, (*list).length as usize) };
            cells.iter().map(|c| unsafe { c.int_value }).collect()
        }
        unsafe fn nth(list: *mut pg_sys::List, n: usize) -> *mut pg_sys::List {
            if list.is_null() || (*list).length as usize <= n {
                return ptr::null_mut();
            }
            (*(*list).elements.add(n)).ptr_value.cast()
        }
        unsafe {
            PlanPrivate {
                pushed: ints(nth(list, 0)),
                any: ints(nth(list, 1)).into_iter().map(|a| a != 0).collect(),
                needed: ints(nth(list, 2)),
                outside: ints(nth(list, 3)).into_iter().map(|o| o != 0).collect(),
            }
        }
    }
}

/// A foreign table's options (`object` says which of the two tables it is).
pub(crate) unsafe fn table_options(foreigntableid: pg_sys::Oid) -> HashMap<String, String> {
    unsafe { def_elems((*pg_sys::GetForeignTable(foreigntableid)).options) }
}

unsafe fn def_elems(list: *mut pg_sys::List) -> HashMap<String, String> {
    let mut options = HashMap::new();
    if list.is_null() {
        return options;
    }
    unsafe {
        for cell in std::slice::from_raw_parts((*list).elements, (*list).length as usize) {
            let def = cell.ptr_value as *mut pg_sys::DefElem;
            let name = CStr::from_ptr((*def).defname).to_string_lossy().into_owned();
            let value = CStr::from_ptr(pg_sys::defGetString(def)).to_string_lossy().into_owned();
            options.insert(name, value);
        }
    }
    options
}

fn object_of(options: &HashMap<String, String>) -> String {
    options.get("object").cloned().unwrap_or_default()
}

#[pg_guard]
pub unsafe extern "C-unwind" fn get_foreign_rel_size(
    root: *mut pg_sys::PlannerInfo,
    baserel: *mut pg_sys::RelOptInfo,
    foreigntableid: pg_sys::Oid,
) {
    unsafe {
        let object = object_of(&table_options(foreigntableid));
        let (mut rows, width) = estimate(&object);
        if object == "predictions" {
            let picked = picked_by(root, baserel, foreigntableid, (*baserel).baserestrictinfo, ptr::null_mut());
            if let Some(keys) = picked.keys {
                rows = keys;
            }
        }
        (*baserel).rows = rows;
        (*(*baserel).reltarget).width = width;
        // Nothing is carried from here to the plan: GetForeignPlan reads the
        // conditions from the planner's own lists.
        (*baserel).fdw_private = ptr::null_mut();
    }
}

#[pg_guard]
pub unsafe extern "C-unwind" fn get_foreign_paths(
    root: *mut pg_sys::PlannerInfo,
    baserel: *mut pg_sys::RelOptInfo,
    foreigntableid: pg_sys::Oid,
) {
    unsafe {
        let rows = (*baserel).rows;
        let scores = object_of(&table_options(foreigntableid)) == "predictions";
        // Every path of a relation that refers to others laterally needs
        // their row.
        let lateral = (*baserel).lateral_relids;
        let own = if scores {
            picked_by(root, baserel, foreigntableid, (*baserel).baserestrictinfo, lateral)
        } else {
            Picked::default()
        };
        // Scans parameterised by the other relations a join condition on
        // the key, the model, the version, the source or the key column
        // reads: `p.key = o.id::text` scores each outer row's key in a
        // nested loop rather than the model's whole source, and a LATERAL
        // subquery's `p.model = m.name` names the model. Only scans that
        // know their model: one that does not can only fail.
        let partners = if scores { parameterisations(root, baserel, foreigntableid) } else { Vec::new() };
        // What joins choose that the scan's own conditions do not: a scan
        // that leaves it to a join filter would score the deployed version
        // (the model's own source, its key column) and the filter would
        // drop every row, where the rows asked for are another version's.
        let joined_choice = partners.iter().fold(0, |c, (_, picked)| c | picked.chooses) & !own.chooses;
        let mut model_by_join = false;
        for (outer, picked) in partners {
            if !picked.model && (!own.model || (picked.keys.is_none() && picked.chooses == 0)) {
                continue;
            }
            model_by_join |= picked.model;
            let inner_rows = picked.keys.unwrap_or(rows);
            let complete = picked.chooses & joined_choice == joined_choice;
            let total = if complete { SCAN_START_COST + inner_rows } else { WRONG_ROWS_COST };
            let path = pg_sys::create_foreignscan_path(
                root,
                baserel,
                ptr::null_mut(),
                inner_rows,
                SCAN_START_COST,
                total,
                ptr::null_mut(),
                outer,
                ptr::null_mut(),
                ptr::null_mut(),
            );
            pg_sys::add_path(baserel, path.cast());
        }
        // A scan that names no model of its own can only fail, and one that
        // leaves a join's choice of version, source or key column to a
        // filter returns the wrong rows: when a join can say it, that plan
        // must win (GetForeignPlan refuses the other).
        // A scan of the wrong rows must lose to any nested loop, however
        // many outer rows it rescans for (disable_cost alone is passed by
        // a parameterised scan of a whole source per row of 10^5 rows).
        let (startup, cost) = if joined_choice != 0 {
            (WRONG_ROWS_COST, WRONG_ROWS_COST)
        } else if model_by_join && !own.model {
            (0.0, pg_sys::disable_cost)
        } else {
            (0.0, rows)
        };
        let path = pg_sys::create_foreignscan_path(
            root,
            baserel,
            ptr::null_mut(),
            rows,
            startup,
            cost,
            ptr::null_mut(),
            lateral,
            ptr::null_mut(),
            ptr::null_mut(),
        );
        pg_sys::add_path(baserel, path.cast());
    }
}

/// Each set of other relations a scan could be parameterised by (see
/// [`join_partners`]), with what the join conditions it would be given
/// pick.
unsafe fn parameterisations(
    root: *mut pg_sys::PlannerInfo,
    baserel: *mut pg_sys::RelOptInfo,
    foreigntableid: pg_sys::Oid,
) -> Vec<(*mut pg_sys::Bitmapset, Picked)> {
    unsafe {
        join_partners(root, baserel)
            .into_iter()
            .filter_map(|outer| {
                let info = pg_sys::get_baserel_parampathinfo(root, baserel, outer);
                (!info.is_null()).then(|| (outer, picked_by(root, baserel, foreigntableid, (*info).ppi_clauses, outer)))
            })
            .collect()
    }
}

/// The cost of a path that would return the wrong rows (a default version
/// where a join gives another): far beyond `disable_cost` (1e10).
const WRONG_ROWS_COST: f64 = 1e16;

/// What a rescan of a parameterised scan costs besides its rows, in the
/// units of a plain scan's (one a row): the source query opened for one key
/// and the row scored alone. Measured on a 2-core machine (53,940 diamonds,
/// 2026-12-05): 37 µs a rescan, 2.4 µs a row of a whole scan, so about 15;
/// a little more, so that a join of many rows still scores in batches.
const SCAN_START_COST: f64 = 20.0;

/// What conditions pick for a scan: how many keys (`key = v`: 1, `key =
/// ANY (...)`: a guess of 10), whether they name a model, and which of
/// [`CHOOSING_COLUMNS`] they give (a bit each, in that order).
#[derive(Default)]
struct Picked {
    keys: Option<f64>,
    model: bool,
    chooses: u8,
    /// Join conditions on a choosing column that the scan cannot use.
    unusable: u8,
}

/// The bits of [`CHOOSING_COLUMNS`] that `clause` reads of this scan.
unsafe fn choosing_columns_read(foreigntableid: pg_sys::Oid, clause: *mut pg_sys::Node, relid: u32) -> u8 {
    unsafe {
        let mut attrs: *mut pg_sys::Bitmapset = ptr::null_mut();
        pg_sys::pull_varattnos(clause, relid, &mut attrs);
        let offset = pg_sys::FirstLowInvalidHeapAttributeNumber;
        let mut bits = 0;
        let mut member = -1;
        loop {
            member = pg_sys::bms_next_member(attrs, member);
            if member < 0 {
                break bits;
            }
            let name = attname(foreigntableid, member + offset);
            if let Some(i) = CHOOSING_COLUMNS.iter().position(|c| *c == name) {
                bits |= 1 << i;
            }
        }
    }
}

/// Whether a pushed value comes from other rows than the query names:
/// another relation of a join (its columns, which become parameters once
/// the plan is made), or an outer query's row (a correlation parameter).
/// Not an InitPlan's output (`version = (SELECT max(version) ...)`), which
/// the query computes once and names as a constant.
unsafe fn comes_from_outside(root: *mut pg_sys::PlannerInfo, value: *mut pg_sys::Node) -> bool {
    unsafe {
        if pg_sys::contain_var_clause(value) {
            return true;
        }
        let node = strip_relabel(value);
        if node.is_null() || (*node).type_ != pg_sys::NodeTag::T_Param {
            return false;
        }
        let param = node as *mut pg_sys::Param;
        if (*param).paramkind != pg_sys::ParamKind::PARAM_EXEC {
            return false;
        }
        let mut level = root;
        while !level.is_null() {
            let plans = (*level).init_plans;
            if !plans.is_null() {
                for cell in std::slice::from_raw_parts((*plans).elements, (*plans).length as usize) {
                    let plan = cell.ptr_value as *mut pg_sys::SubPlan;
                    if pg_sys::list_member_int((*plan).setParam, (*param).paramid) {
                        return false;
                    }
                }
            }
            level = (*level).parent_root;
        }
        true
    }
}

/// Whether `value` is a choosing column of another `cerebro.predictions`
/// scan of the query.
unsafe fn echoes_another_scans_choice(root: *mut pg_sys::PlannerInfo, value: *mut pg_sys::Node) -> bool {
    unsafe {
        let node = strip_relabel(value);
        if node.is_null() || (*node).type_ != pg_sys::NodeTag::T_Var {
            return false;
        }
        let var = node as *mut pg_sys::Var;
        if (*var).varlevelsup != 0 || (*var).varno < 1 || (*var).varno >= (*root).simple_rel_array_size {
            return false;
        }
        let rte = *(*root).simple_rte_array.add((*var).varno as usize);
        if rte.is_null()
            || (*rte).rtekind != pg_sys::RTEKind::RTE_RELATION
            || (*rte).relkind != pg_sys::RELKIND_FOREIGN_TABLE as std::ffi::c_char
        {
            return false;
        }
        let table = pg_sys::GetForeignTable((*rte).relid);
        object_of(&def_elems((*table).options)) == "predictions"
            && CHOOSING_COLUMNS.contains(&attname((*rte).relid, (*var).varattno as i32).as_str())
    }
}

/// The columns besides `model` whose value chooses which rows exist at all
/// (a version's, a source's, by a key column), where a scan told nothing
/// takes a default.
const CHOOSING_COLUMNS: [&str; 3] = ["version", "source", "key_column"];

/// What the pushable conditions among `clauses` (RestrictInfos) pick, their
/// values reading only the relations of `outer`.
unsafe fn picked_by(
    root: *mut pg_sys::PlannerInfo,
    baserel: *mut pg_sys::RelOptInfo,
    foreigntableid: pg_sys::Oid,
    clauses: *mut pg_sys::List,
    outer: *mut pg_sys::Bitmapset,
) -> Picked {
    let mut picked = Picked::default();
    unsafe {
        if clauses.is_null() {
            return picked;
        }
        let relid = (*baserel).relid;
        for cell in std::slice::from_raw_parts((*clauses).elements, (*clauses).length as usize) {
            let rinfo = cell.ptr_value as *mut pg_sys::RestrictInfo;
            let Some((attnum, value, any)) = pushable(root, (*rinfo).clause.cast(), relid, outer) else {
                // A join condition on a choosing column the scan cannot use
                // (`p.version::text = a.v`, `p.version > a.v`).
                if !outer.is_null() {
                    picked.unusable |= choosing_columns_read(foreigntableid, (*rinfo).clause.cast(), relid);
                }
                continue;
            };
            match attname(foreigntableid, attnum).as_str() {
                "key" => {
                    let keys = if any { 10.0 } else { 1.0 };
                    picked.keys = Some(picked.keys.map_or(keys, |k: f64| k.min(keys)));
                }
                "model" => picked.model = true,
                // Another scoring scan's own choice (`USING (source)` between
                // two scans) is its default as much as this one's: no choice.
                _ if echoes_another_scans_choice(root, value) => {}
                other => {
                    if let Some(i) = CHOOSING_COLUMNS.iter().position(|c| *c == other) {
                        picked.chooses |= 1 << i;
                    }
                }
            }
        }
    }
    picked
}

/// Most other relations whose pairs are tried as a parameterised scan's
/// outer relations (the key from one, the model from another).
const PAIRED_RELATIONS: usize = 8;

/// The sets of other relations a parameterised scan could be given a row
/// of: each other relation of the query alone (an equality such as `p.key =
/// d.id::text` lives in an equivalence class, not in the join clauses, and
/// PostgreSQL derives it for a scan parameterised by `d`), each pair of
/// them (the key from one, the model from another), and the relations each
/// of this scan's other join conditions reads; each with the relations
/// this one refers to laterally, and each once. Never this scan's own
/// parents (an appendrel's: a `UNION ALL` or a partitioned table) nor the
/// relations that refer to this one laterally.
unsafe fn join_partners(
    root: *mut pg_sys::PlannerInfo,
    baserel: *mut pg_sys::RelOptInfo,
) -> Vec<*mut pg_sys::Bitmapset> {
    let mut partners: Vec<*mut pg_sys::Bitmapset> = Vec::new();
    unsafe {
        let lateral = (*baserel).lateral_relids;
        let excluded = pg_sys::bms_union(
            pg_sys::bms_union((*baserel).relids, (*baserel).top_parent_relids),
            (*baserel).lateral_referencers,
        );
        let mut add = |outer: *mut pg_sys::Bitmapset| {
            let outer = pg_sys::bms_union(outer, lateral);
            if pg_sys::bms_is_empty(outer)
                || pg_sys::bms_overlap(outer, excluded)
                || partners.iter().any(|&p| pg_sys::bms_equal(p, outer))
            {
                return;
            }
            partners.push(outer);
        };
        let mut others = Vec::new();
        let mut member = -1;
        loop {
            member = pg_sys::bms_next_member((*root).all_baserels, member);
            if member < 0 {
                break;
            }
            if !pg_sys::bms_is_member(member, excluded) {
                others.push(member);
            }
        }
        for &one in &others {
            add(pg_sys::bms_make_singleton(one));
        }
        if others.len() <= PAIRED_RELATIONS {
            for (i, &one) in others.iter().enumerate() {
                for &two in &others[i + 1..] {
                    add(pg_sys::bms_add_member(pg_sys::bms_make_singleton(one), two));
                }
            }
        }
        let joininfo = (*baserel).joininfo;
        if !joininfo.is_null() {
            for cell in std::slice::from_raw_parts((*joininfo).elements, (*joininfo).length as usize) {
                let clause_relids = (*(cell.ptr_value as *mut pg_sys::RestrictInfo)).clause_relids;
                add(pg_sys::bms_difference(clause_relids, (*baserel).relids));
            }
        }
    }
    partners
}

/// The relations a path is parameterised by (null: none).
unsafe fn outer_relids(path: *mut pg_sys::Path) -> *mut pg_sys::Bitmapset {
    unsafe {
        let info = (*path).param_info;
        if info.is_null() {
            ptr::null_mut()
        } else {
            (*info).ppi_req_outer
        }
    }
}

/// A column's name ("" for one that is not there).
unsafe fn attname(foreigntableid: pg_sys::Oid, attnum: i32) -> String {
    unsafe {
        let name = pg_sys::get_attname(foreigntableid, attnum as i16, true);
        if name.is_null() {
            String::new()
        } else {
            CStr::from_ptr(name).to_string_lossy().into()
        }
    }
}

/// Strips binary-compatible casts (`varchar` to `text`).
unsafe fn strip_relabel(mut node: *mut pg_sys::Node) -> *mut pg_sys::Node {
    unsafe {
        while !node.is_null() && (*node).type_ == pg_sys::NodeTag::T_RelabelType {
            node = (*(node as *mut pg_sys::RelabelType)).arg.cast();
        }
    }
    node
}

/// The attribute of this scan a node is, if it is one.
unsafe fn scan_column(node: *mut pg_sys::Node, relid: u32) -> Option<i32> {
    unsafe {
        let node = strip_relabel(node);
        if node.is_null() || (*node).type_ != pg_sys::NodeTag::T_Var {
            return None;
        }
        let var = node as *mut pg_sys::Var;
        ((*var).varno as u32 == relid && (*var).varlevelsup == 0 && (*var).varattno >= 1)
            .then_some((*var).varattno as i32)
    }
}

/// Whether an expression can be evaluated once when the scan begins (and
/// again on each rescan): it reads no column of any relation at this level
/// but those of `outer`, the relations a parameterised scan is given a row
/// of (none for a plain scan), calls nothing volatile and has no subquery of
/// its own to run per row.
unsafe fn evaluable_at_start(
    root: *mut pg_sys::PlannerInfo,
    node: *mut pg_sys::Node,
    outer: *mut pg_sys::Bitmapset,
) -> bool {
    unsafe {
        let reads_outer_only = if pg_sys::contain_var_clause(node) {
            !outer.is_null() && pg_sys::bms_is_subset(pg_sys::pull_varnos(root, node), outer)
        } else {
            true
        };
        reads_outer_only && !pg_sys::contain_volatile_functions(node) && !pg_sys::contain_subplans(node)
    }
}

/// A built-in equality (one that merge-joins: equality of a btree family;
/// any role may mark an operator of its own MERGES, so only built-in ones
/// count), under a collation where equal means the same bytes (the source
/// query compares keys with the default collation).
unsafe fn is_equality(opno: pg_sys::Oid, input_type: pg_sys::Oid, collation: pg_sys::Oid) -> bool {
    unsafe {
        opno.to_u32() < pg_sys::FirstNormalObjectId
            && pg_sys::op_mergejoinable(opno, input_type)
            && (collation == pg_sys::InvalidOid || pg_sys::get_collation_isdeterministic(collation))
    }
}

/// The columns a scoring scan uses to choose its model and rows; conditions
/// on the others (`score`, `label`) are only PostgreSQL's filter.
const PUSHED_COLUMNS: [&str; 7] = ["model", "version", "source", "key_column", "key", "explain", "top_k"];

/// The operator of a pushed `column = value` whose value comes from outside
/// the scan's query level (a join's other relation, an outer row, a
/// subquery: a PARAM_EXEC parameter), for the wrapper to tell it from a
/// value the query names.
pub(crate) const OUTSIDE_EQUALS: &str = "= (from outside the scan)";

/// Columns a scan shows exactly as the condition that chose them said:
/// `model = 'm'` scores model `m` and every row it returns says `m`.
const ECHOED_COLUMNS: [&str; 3] = ["model", "source", "key_column"];

/// Whether `clause`, a pushed `column = value` on a column of
/// [`ECHOED_COLUMNS`], holds for every row the scan returns, so that
/// PostgreSQL need not check it again on each row: text equality with a
/// text value (which the scan takes as it is), and one value, not a list.
/// A second condition on the same column still needs checking; the caller
/// sees to that.
unsafe fn echoes(clause: *mut pg_sys::Node, value: *mut pg_sys::Node, any: bool) -> bool {
    unsafe {
        !any && (*clause).type_ == pg_sys::NodeTag::T_OpExpr
            && (*(clause as *mut pg_sys::OpExpr)).opno == pg_sys::Oid::from(pg_sys::TextEqualOperator)
            && pg_sys::exprType(value) == pg_sys::TEXTOID
    }
}

/// `column = value` or `column = ANY (array)` over this scan, as
/// (attnum, value expression, is ANY); the value may read the relations of
/// `outer` (see [`evaluable_at_start`]).
unsafe fn pushable(
    root: *mut pg_sys::PlannerInfo,
    clause: *mut pg_sys::Node,
    relid: u32,
    outer: *mut pg_sys::Bitmapset,
) -> Option<(i32, *mut pg_sys::Node, bool)> {
    unsafe {
        if clause.is_null() {
            return None;
        }
        match (*clause).type_ {
            // `WHERE explain`: the planner's form of `explain = true`.
            pg_sys::NodeTag::T_Var => {
                let attnum = scan_column(clause, relid)?;
                (pg_sys::exprType(clause) == pg_sys::BOOLOID)
                    .then(|| (attnum, pg_sys::makeBoolConst(true, false).cast(), false))
            }
            pg_sys::NodeTag::T_OpExpr => {
                let op = clause as *mut pg_sys::OpExpr;
                let args = (*op).args;
                if args.is_null() || (*args).length != 2 {
                    return None;
                }
                let left: *mut pg_sys::Node = (*(*args).elements).ptr_value.cast();
                let right: *mut pg_sys::Node = (*(*args).elements.add(1)).ptr_value.cast();
                let (attnum, value) = match (scan_column(left, relid), scan_column(right, relid)) {
                    (Some(a), None) => (a, right),
                    (None, Some(a)) => (a, left),
                    _ => return None,
                };
                let input_type = pg_sys::exprType(strip_relabel(left));
                (is_equality((*op).opno, input_type, (*op).inputcollid) && evaluable_at_start(root, value, outer))
                    .then_some((attnum, value, false))
            }
            pg_sys::NodeTag::T_ScalarArrayOpExpr => {
                let op = clause as *mut pg_sys::ScalarArrayOpExpr;
                let args = (*op).args;
                if !(*op).useOr || args.is_null() || (*args).length != 2 {
                    return None;
                }
                let left: *mut pg_sys::Node = (*(*args).elements).ptr_value.cast();
                let right: *mut pg_sys::Node = (*(*args).elements.add(1)).ptr_value.cast();
                let attnum = scan_column(left, relid)?;
                let input_type = pg_sys::exprType(strip_relabel(left));
                (is_equality((*op).opno, input_type, (*op).inputcollid) && evaluable_at_start(root, right, outer))
                    .then_some((attnum, right, true))
            }
            _ => None,
        }
    }
}

/// The attributes a query reads from this scan (empty: every one).
unsafe fn needed_attributes(baserel: *mut pg_sys::RelOptInfo, clauses: *mut pg_sys::List) -> Vec<i32> {
    unsafe {
        let relid = (*baserel).relid;
        let mut attrs: *mut pg_sys::Bitmapset = ptr::null_mut();
        pg_sys::pull_varattnos((*(*baserel).reltarget).exprs.cast(), relid, &mut attrs);
        pg_sys::pull_varattnos(clauses.cast(), relid, &mut attrs);
        let offset = pg_sys::FirstLowInvalidHeapAttributeNumber;
        let mut needed = Vec::new();
        let mut member = -1;
        loop {
            member = pg_sys::bms_next_member(attrs, member);
            if member < 0 {
                break;
            }
            let attnum = member + offset;
            if attnum == 0 {
                // A whole-row reference reads everything.
                return Vec::new();
            }
            if attnum > 0 {
                needed.push(attnum);
            }
        }
        if needed.is_empty() {
            // `SELECT count(*)`: rows still have to be produced; one column
            // keeps the slot's shape honest without converting the others.
            needed.push(1);
        }
        needed
    }
}

#[pg_guard]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C-unwind" fn get_foreign_plan(
    root: *mut pg_sys::PlannerInfo,
    baserel: *mut pg_sys::RelOptInfo,
    foreigntableid: pg_sys::Oid,
    best_path: *mut pg_sys::ForeignPath,
    tlist: *mut pg_sys::List,
    scan_clauses: *mut pg_sys::List,
    outer_plan: *mut pg_sys::Plan,
) -> *mut pg_sys::ForeignScan {
    unsafe {
        let relid = (*baserel).relid;
        let scores = object_of(&table_options(foreigntableid)) == "predictions";
        let mut private = PlanPrivate { pushed: Vec::new(), any: Vec::new(), needed: Vec::new(), outside: Vec::new() };
        let mut fdw_exprs: *mut pg_sys::List = ptr::null_mut();
        let mut echoed: Vec<(i32, *mut pg_sys::RestrictInfo)> = Vec::new();
        // A parameterised path's join conditions come in `scan_clauses` with
        // the outer relations' columns, which PostgreSQL turns into
        // parameters in `fdw_exprs` once this returns.
        let outer = outer_relids(best_path.cast());
        if scores && !scan_clauses.is_null() {
            for cell in std::slice::from_raw_parts((*scan_clauses).elements, (*scan_clauses).length as usize) {
                let rinfo = cell.ptr_value as *mut pg_sys::RestrictInfo;
                if let Some((attnum, value, any)) = pushable(root, (*rinfo).clause.cast(), relid, outer) {
                    let name = attname(foreigntableid, attnum);
                    if !PUSHED_COLUMNS.contains(&name.as_str()) {
                        continue;
                    }
                    // Another scoring scan's own choice is no choice of this
                    // one's, in any plan: only a filter.
                    if CHOOSING_COLUMNS.contains(&name.as_str()) && echoes_another_scans_choice(root, value) {
                        continue;
                    }
                    if ECHOED_COLUMNS.contains(&name.as_str()) && echoes((*rinfo).clause.cast(), value, any) {
                        echoed.push((attnum, rinfo));
                    }
                    private.pushed.push(attnum);
                    private.any.push(any);
                    private.outside.push(comes_from_outside(root, value));
                    fdw_exprs = pg_sys::lappend(fdw_exprs, value.cast());
                }
            }
        }
        if scores {
            refuse_a_choice_left_to_a_join(root, baserel, foreigntableid, &private.pushed);
        }
        // Every other condition stays a filter PostgreSQL checks on each row.
        let mut kept: *mut pg_sys::List = ptr::null_mut();
        if !scan_clauses.is_null() {
            for cell in std::slice::from_raw_parts((*scan_clauses).elements, (*scan_clauses).length as usize) {
                let rinfo = cell.ptr_value as *mut pg_sys::RestrictInfo;
                let only_condition_on_its_column = echoed
                    .iter()
                    .find(|(_, r)| *r == rinfo)
                    .is_some_and(|(attnum, _)| private.pushed.iter().filter(|&&a| a == *attnum).count() == 1);
                if !only_condition_on_its_column {
                    kept = pg_sys::lappend(kept, rinfo.cast());
                }
            }
        }
        let local_quals = pg_sys::extract_actual_clauses(kept, false);
        private.needed = needed_attributes(baserel, local_quals);
        pg_sys::make_foreignscan(
            tlist,
            local_quals,
            relid,
            fdw_exprs,
            private.to_list(),
            ptr::null_mut(),
            ptr::null_mut(),
            outer_plan,
        )
    }
}

/// Raises an error when a join gives this scan a version, source or key
/// column that the plan does not push to it (`pushed`, attribute numbers),
/// which happens only when no parameterised scan could be used (the path
/// that leaves it to a filter costs `disable_cost`): the scan would score
/// the default's rows and the join would drop them all.
unsafe fn refuse_a_choice_left_to_a_join(
    root: *mut pg_sys::PlannerInfo,
    baserel: *mut pg_sys::RelOptInfo,
    foreigntableid: pg_sys::Oid,
    pushed: &[i32],
) {
    unsafe {
        let own = picked_by(root, baserel, foreigntableid, (*baserel).baserestrictinfo, (*baserel).lateral_relids);
        let partners = parameterisations(root, baserel, foreigntableid);
        let joined = partners.iter().fold(0, |c, (_, picked)| c | picked.chooses) & !own.chooses;
        let unusable = partners.iter().fold(0, |c, (_, picked)| c | picked.unusable);
        if let Some(i) = (0..CHOOSING_COLUMNS.len()).find(|i| unusable & (1 << i) != 0) {
            raise(CerebroError::ChoiceLeftToJoin(CHOOSING_COLUMNS[i]));
        }
        let given = pushed.iter().fold(0u8, |c, &attnum| {
            let name = attname(foreigntableid, attnum);
            c | CHOOSING_COLUMNS.iter().position(|n| *n == name).map_or(0, |i| 1 << i)
        });
        if let Some(i) = (0..CHOOSING_COLUMNS.len()).find(|i| joined & !given & (1 << i) != 0) {
            raise(CerebroError::ChoiceLeftToJoin(CHOOSING_COLUMNS[i]));
        }
    }
}

/// One execution of a scan: built in BeginForeignScan, freed in
/// EndForeignScan or, when the query fails first, with the query's memory.
struct ScanExecution<W> {
    fdw: W,
    options: HashMap<String, String>,
    columns: Vec<Column>,
    /// (column name, is ANY, prepared value expression, whether the value
    /// comes from outside the scan's own query level: another relation of a
    /// join, a LATERAL or correlated outer row, a subquery) of each pushed
    /// condition.
    pushed: Vec<(String, bool, *mut pg_sys::ExprState, bool)>,
    row: Row,
    /// Whether [`ForeignDataWrapper::begin_scan`] ran: on the first row, not in
    /// BeginForeignScan, because a value computed by an InitPlan
    /// (`model = (SELECT ...)`) is only ready once the executor runs.
    started: bool,
}

/// Where a scan's state lives: palloc'd in the query's memory context, whose
/// reset callback frees the state if the scan never reached its end.
#[repr(C)]
struct ScanHandle<W> {
    callback: pg_sys::MemoryContextCallback,
    execution: *mut ScanExecution<W>,
}

unsafe extern "C-unwind" fn free_abandoned_scan<W>(arg: *mut c_void) {
    let handle = arg as *mut ScanHandle<W>;
    unsafe {
        let execution = std::mem::replace(&mut (*handle).execution, ptr::null_mut());
        if !execution.is_null() {
            // Dropping closes the daemon connection and unmaps the regions;
            // nothing in it calls back into PostgreSQL.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(Box::from_raw(execution))));
        }
    }
}

unsafe fn relation_columns(rel: pg_sys::Relation, needed: &[i32]) -> Vec<Column> {
    unsafe {
        let desc = (*rel).rd_att;
        let attrs = (*desc).attrs.as_slice((*desc).natts as usize);
        attrs
            .iter()
            .filter(|a| !a.attisdropped && (needed.is_empty() || needed.contains(&(a.attnum as i32))))
            .map(|a| Column {
                name: pgrx::name_data_to_str(&a.attname).to_owned(),
                num: a.attnum as usize,
                type_oid: a.atttypid,
            })
            .collect()
    }
}

/// What a pushed condition's value turned out to be when the scan began.
enum Pushed {
    /// Narrows the scan.
    Value(Value),
    /// NULL: the (strict, built-in) equality matches no row at all.
    MatchesNothing,
    /// A value Cerebro cannot narrow by: PostgreSQL's filter alone decides.
    Unused,
}

/// A pushed condition's value, evaluated now.
unsafe fn evaluate(state: *mut pg_sys::ExprState, econtext: *mut pg_sys::ExprContext, any: bool) -> Pushed {
    unsafe {
        let old = pg_sys::MemoryContextSwitchTo((*econtext).ecxt_per_tuple_memory);
        let mut isnull = false;
        let datum = (*state).evalfunc.map(|eval| eval(state, econtext, &mut isnull));
        pg_sys::MemoryContextSwitchTo(old);
        let Some(datum) = datum else { return Pushed::Unused };
        if isnull {
            return Pushed::MatchesNothing;
        }
        let type_oid = pg_sys::exprType((*state).expr.cast());
        // Text that is not ASCII, in a database whose encoding is not
        // UTF-8, cannot be a Rust string: PostgreSQL's filter decides alone.
        if !any {
            if !crate::fetch::reads_as_string(datum, type_oid) {
                return Pushed::Unused;
            }
            return Cell::from_polymorphic_datum(datum, false, type_oid)
                .map_or(Pushed::Unused, |c| Pushed::Value(Value::Cell(c)));
        }
        let element_type = pg_sys::get_element_type(type_oid);
        if element_type == pg_sys::InvalidOid {
            return Pushed::Unused;
        }
        let array = pg_sys::pg_detoast_datum(datum.cast_mut_ptr()) as *mut pg_sys::ArrayType;
        let (mut len, mut byval, mut align) = (0i16, false, 0 as std::ffi::c_char);
        pg_sys::get_typlenbyvalalign(element_type, &mut len, &mut byval, &mut align);
        let (mut elements, mut nulls, mut count) = (ptr::null_mut(), ptr::null_mut(), 0);
        pg_sys::deconstruct_array(array, element_type, len as i32, byval, align, &mut elements, &mut nulls, &mut count);
        // NULL elements match nothing; one element Cerebro cannot read and
        // the scan cannot be narrowed by the list.
        let mut cells = Vec::with_capacity(count as usize);
        for i in (0..count as usize).filter(|&i| !*nulls.add(i)) {
            if !crate::fetch::reads_as_string(*elements.add(i), element_type) {
                return Pushed::Unused;
            }
            match Cell::from_polymorphic_datum(*elements.add(i), false, element_type) {
                Some(cell) => cells.push(cell),
                None => return Pushed::Unused,
            }
        }
        Pushed::Value(Value::Array(cells))
    }
}

impl<W: ForeignDataWrapper<CerebroError>> ScanExecution<W> {
    /// The pushed conditions as [`Qual`]s; `None` when one matches nothing.
    unsafe fn quals(&self, econtext: *mut pg_sys::ExprContext) -> Result<Option<Vec<Qual>>, CerebroError> {
        let mut quals = Vec::with_capacity(self.pushed.len());
        for (field, any, state, outside) in &self.pushed {
            match unsafe { evaluate(*state, econtext, *any) } {
                Pushed::Value(value) => {
                    // A value from outside the scan says so in its operator.
                    let operator = if *outside { OUTSIDE_EQUALS } else { "=" };
                    quals.push(Qual {
                        field: field.clone(),
                        operator: operator.into(),
                        value,
                        use_or: *any,
                        param: None,
                    })
                }
                Pushed::MatchesNothing => return Ok(None),
                // A version, source or key column left unread would score
                // the default's rows, which the filter would then cut.
                Pushed::Unused if !*any => {
                    if let Some(column) = CHOOSING_COLUMNS.iter().find(|c| **c == field.as_str()) {
                        return Err(CerebroError::UnreadableChoice(column));
                    }
                }
                Pushed::Unused => {}
            }
        }
        Ok(Some(quals))
    }

    /// Begins the scan with the pushed values; false when they match no row
    /// (`model = NULL`), which then scores nothing, as PostgreSQL's filter
    /// would keep nothing.
    unsafe fn begin(&mut self, econtext: *mut pg_sys::ExprContext) -> Result<bool, CerebroError> {
        let Some(quals) = (unsafe { self.quals(econtext) })? else { return Ok(false) };
        self.started = true;
        match self.fdw.begin_scan(&quals, &self.columns, &[], &None, &self.options) {
            Err(CerebroError::NothingToScore) => {
                self.started = false;
                Ok(false)
            }
            other => other.map(|()| true),
        }
    }

    fn end(&mut self) -> Result<(), CerebroError> {
        if !std::mem::replace(&mut self.started, false) {
            return Ok(());
        }
        self.fdw.end_scan()
    }
}

#[pg_guard]
pub unsafe extern "C-unwind" fn begin_foreign_scan<W: ForeignDataWrapper<CerebroError>>(
    node: *mut pg_sys::ForeignScanState,
    eflags: i32,
) {
    unsafe {
        if eflags & pg_sys::EXEC_FLAG_EXPLAIN_ONLY as i32 != 0 {
            return;
        }
        let plan = (*node).ss.ps.plan as *mut pg_sys::ForeignScan;
        let rel = (*node).ss.ss_currentRelation;
        let private = PlanPrivate::from_list((*plan).fdw_private);
        let table = pg_sys::GetForeignTable((*rel).rd_id);
        let server = pg_sys::GetForeignServer((*table).serverid);
        let server = ForeignServer {
            server_oid: (*server).serverid,
            server_name: CStr::from_ptr((*server).servername).to_string_lossy().into_owned(),
            server_type: None,
            server_version: None,
            options: def_elems((*server).options),
        };
        let fdw = W::new(server).unwrap_or_else(|e| raise(e));
        let states = pg_sys::ExecInitExprList((*plan).fdw_exprs, node.cast());
        let desc = (*rel).rd_att;
        let attrs = (*desc).attrs.as_slice((*desc).natts as usize);
        let pushed = private
            .pushed
            .iter()
            .zip(&private.any)
            .enumerate()
            .map(|(i, (&attnum, &any))| {
                let name = pgrx::name_data_to_str(&attrs[attnum as usize - 1].attname).to_owned();
                let outside = private.outside.get(i).copied().unwrap_or(false);
                (name, any, (*(*states).elements.add(i)).ptr_value as *mut pg_sys::ExprState, outside)
            })
            .collect();
        let execution = Box::into_raw(Box::new(ScanExecution {
            fdw,
            options: def_elems((*table).options),
            columns: relation_columns(rel, &private.needed),
            pushed,
            row: Row::new(),
            started: false,
        }));
        // A failure from here on frees the state with the query's memory.
        let handle = pg_sys::palloc0(std::mem::size_of::<ScanHandle<W>>()) as *mut ScanHandle<W>;
        (*handle).execution = execution;
        (*handle).callback.func = Some(free_abandoned_scan::<W>);
        (*handle).callback.arg = handle.cast();
        pg_sys::MemoryContextRegisterResetCallback(pg_sys::CurrentMemoryContext, &mut (*handle).callback);
        (*node).fdw_state = handle.cast();
    }
}

unsafe fn execution_of<'a, W>(node: *mut pg_sys::ForeignScanState) -> Option<&'a mut ScanExecution<W>> {
    unsafe {
        let handle = (*node).fdw_state as *mut ScanHandle<W>;
        if handle.is_null() || (*handle).execution.is_null() {
            None
        } else {
            Some(&mut *(*handle).execution)
        }
    }
}

/// A wrapper that can write some scans' rows straight into the scan slot,
/// without the framework's [`Row`] of [`Cell`]s in between (a `String` per
/// text value, made and then copied into a datum): a scan that scores a
/// table hands out hundreds of thousands of rows.
pub trait SlotRows {
    /// Writes the next row into `values` and `nulls` (one per attribute of
    /// the relation, all NULL on entry) and says whether there was one;
    /// `None` when this scan hands out its rows through `iter_scan`.
    fn next_into(&mut self, values: &mut [pg_sys::Datum], nulls: &mut [bool]) -> Option<Result<bool, CerebroError>>;
}

#[pg_guard]
pub unsafe extern "C-unwind" fn iterate_foreign_scan<W: ForeignDataWrapper<CerebroError> + SlotRows>(
    node: *mut pg_sys::ForeignScanState,
) -> *mut pg_sys::TupleTableSlot {
    unsafe {
        let slot = (*node).ss.ss_ScanTupleSlot;
        if let Some(clear) = (*(*slot).tts_ops).clear {
            clear(slot);
        }
        let Some(execution) = execution_of::<W>(node) else { return slot };
        if !execution.started {
            match execution.begin((*node).ss.ps.ps_ExprContext) {
                Ok(true) => {}
                Ok(false) => return slot,
                Err(e) => raise(e),
            }
        }
        let natts = (*(*slot).tts_tupleDescriptor).natts as usize;
        let values = std::slice::from_raw_parts_mut((*slot).tts_values, natts);
        let nulls = std::slice::from_raw_parts_mut((*slot).tts_isnull, natts);
        nulls.fill(true);
        // Datums are made in the per-tuple context the executor switched
        // to, and live until the next row.
        if let Some(next) = execution.fdw.next_into(values, nulls) {
            return match next {
                Err(e) => raise(e),
                Ok(false) => slot,
                Ok(true) => {
                    pg_sys::ExecStoreVirtualTuple(slot);
                    slot
                }
            };
        }
        execution.row = Row::new();
        match execution.fdw.iter_scan(&mut execution.row) {
            Err(e) => raise(e),
            Ok(None) => slot,
            Ok(Some(())) => {
                for (column, cell) in execution.columns.iter().zip(execution.row.cells.drain(..)) {
                    if let Some(datum) = cell.and_then(|c| c.into_datum()) {
                        values[column.num - 1] = datum;
                        nulls[column.num - 1] = false;
                    }
                }
                pg_sys::ExecStoreVirtualTuple(slot);
                slot
            }
        }
    }
}

#[pg_guard]
pub unsafe extern "C-unwind" fn re_scan_foreign_scan<W: ForeignDataWrapper<CerebroError>>(
    node: *mut pg_sys::ForeignScanState,
) {
    unsafe {
        let Some(execution) = execution_of::<W>(node) else { return };
        // The pushed values may have changed (an outer row's parameter): the
        // next row begins the scan again with them.
        if let Err(e) = execution.end() {
            raise(e);
        }
    }
}

#[pg_guard]
pub unsafe extern "C-unwind" fn end_foreign_scan<W: ForeignDataWrapper<CerebroError>>(
    node: *mut pg_sys::ForeignScanState,
) {
    unsafe {
        let handle = (*node).fdw_state as *mut ScanHandle<W>;
        if handle.is_null() || (*handle).execution.is_null() {
            return;
        }
        let mut execution = Box::from_raw(std::mem::replace(&mut (*handle).execution, ptr::null_mut()));
        let ended = execution.end();
        drop(execution);
        if let Err(e) = ended {
            raise(e);
        }
    }
}

#[pg_guard]
pub unsafe extern "C-unwind" fn explain_foreign_scan(
    node: *mut pg_sys::ForeignScanState,
    es: *mut pg_sys::ExplainState,
) {
    unsafe {
        let plan = (*node).ss.ps.plan as *mut pg_sys::ForeignScan;
        let private = PlanPrivate::from_list((*plan).fdw_private);
        if private.pushed.is_empty() {
            return;
        }
        let rel = (*node).ss.ss_currentRelation;
        let desc = (*rel).rd_att;
        let attrs = (*desc).attrs.as_slice((*desc).natts as usize);
        let pushed: Vec<String> = private
            .pushed
            .iter()
            .zip(&private.any)
            .map(|(&attnum, &any)| {
                let name = pgrx::name_data_to_str(&attrs[attnum as usize - 1].attname);
                if any {
                    format!("{name} = ANY (...)")
                } else {
                    format!("{name} = ...")
                }
            })
            .collect();
        let text = std::ffi::CString::new(pushed.join(", ")).expect("column names have no NUL");
        pg_sys::ExplainPropertyText(c"Cerebro Conditions".as_ptr(), text.as_ptr(), es);
    }
}
