"""Study-level outputs: tables (CSV/Markdown with paired tests), figures (PNG), one self-contained HTML."""
