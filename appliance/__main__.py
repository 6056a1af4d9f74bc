from appliance.tools.cli import app

app(prog_name="python -m appliance")
