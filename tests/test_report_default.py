def test_markdown_table():
    from shardlib.report_default import markdown_table

    assert markdown_table(["a", "b"], [["1", 2]]) == "| a | b |\n| --- | --- |\n| 1 | 2 |"
