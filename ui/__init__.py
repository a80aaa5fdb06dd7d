"""The page, a room per part: `explorer`, `contrast` and `circuit_map` (one tab each), `api` (the JSON
endpoints), `handlers` (what they all call: widgets' values in, core results through the runner,
figures and JSON out) and `common` (lanes, error messages, examples, validators, explanations).
`app.build_demo` puts them together."""
