"""What the analysts' connection refuses, judged on the engine's own parse (its ``EXPLAIN AST`` text, as
chDB prints it), and how its limits and parameters are set."""

from __future__ import annotations

import pytest

from throttlex.processors.accounting.readonly_sql import SqlLimits, escape_parameter, refusal

SELECT_AST = """SelectWithUnionQuery (children 1)
 ExpressionList (children 1)
  SelectQuery (children 2)
   ExpressionList (children 1)
    Function count (children 1)
     ExpressionList
   TablesInSelectQuery (children 1)
    TablesInSelectQueryElement (children 1)
     TableExpression (children 1)
      TableIdentifier usage_events
"""


def test_a_plain_select_show_describe_exists_and_explain_are_served() -> None:
    assert refusal("SELECT count() FROM usage_events", SELECT_AST) is None
    assert refusal("SHOW TABLES", "ShowTables\n") is None
    assert refusal("DESCRIBE TABLE usage_events", "DescribeQuery (children 1)\n TableExpression (children 1)\n") is None
    assert refusal("EXISTS TABLE t", "ExistsTableQuery default t (children 2)\n") is None
    assert refusal("EXPLAIN SELECT 1", "Explain EXPLAIN (children 1)\n SelectWithUnionQuery (children 1)\n") is None


@pytest.mark.parametrize(
    ("statement", "ast"),
    [
        ("KILL QUERY WHERE 1 ASYNC", "KillQueryQuery Literal_UInt64_1 ASYNC (children 1)\n Literal UInt64_1\n"),
        ("INSERT INTO t VALUES", "InsertQuery (children 1)\n Identifier t\n"),
        ("SET readonly = 0", "Set\n"),
        ("SYSTEM FLUSH LOGS", "SYSTEM query\n"),
    ],
)
def test_statements_other_than_reads_are_refused(statement: str, ast: str) -> None:
    reason = refusal(statement, ast)
    assert reason is not None and statement.split()[0] in reason


def test_a_function_reaching_outside_the_engine_is_refused_wherever_it_is_and_however_it_is_spelled() -> None:
    scalar = SELECT_AST.replace("Function count", "Function file")
    assert refusal("SELECT file('/etc/passwd')", scalar) == "file() reaches files, the network or programs outside the engine"
    for name in ("s3Cluster", "URL", "remoteSecure", "executable", "Python", "azureBlobStorage", "icebergS3", "mysql"):
        assert refusal("SELECT …", SELECT_AST.replace("Function count", f"Function {name}")) is not None, name
    for harmless in ("numbers", "merge", "fileSize", "formatReadableSize", "urlDecode"):
        assert refusal("SELECT …", SELECT_AST.replace("Function count", f"Function {harmless}")) is None, harmless


def test_into_outfile_is_refused() -> None:
    assert refusal("SELECT 1 INTO OUTFILE 'x'", SELECT_AST) == "INTO OUTFILE would write a file on the server"


def test_limits_are_set_before_readonly_which_comes_last() -> None:
    statements = SqlLimits(max_execution_time_s=1.5, max_result_rows=10).statements()
    assert statements[-1] == "SET readonly = 1"
    assert "SET max_execution_time = 1.5" in statements and "SET max_result_rows = 10" in statements


def test_a_parameter_value_is_escaped_as_the_engine_parses_it() -> None:
    assert escape_parameter("SELECT 'a\\b'\t-- c\r\n") == "SELECT 'a\\\\b'\\t-- c\\r\\n"
