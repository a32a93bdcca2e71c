//! SQL text both sides build.

/// Quotes an SQL identifier (always, so any name is safe).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    #[test]
    fn identifiers_are_always_quoted_and_escaped() {
        assert_eq!(super::quote_ident("churn"), "\"churn\"");
        assert_eq!(super::quote_ident("we\"ird"), "\"we\"\"ird\"");
    }
}
