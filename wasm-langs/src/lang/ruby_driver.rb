# The SoulBox kernel driver for CRuby, evaluated once when the pack is pre-initialised.
# `SoulBox.run` evaluates one cell in a binding kept across cells and returns a JSON report.
require "json"
require "stringio"

module SoulBox
  CELL_BINDING = TOPLEVEL_BINDING

  def self.run(code, env_json, fresh)
    Random.srand if fresh
    # The cell's variables hold for this cell only.
    env = JSON.parse(env_json)
    saved_env = env.keys.to_h { |k| [k, ENV[k]] }
    env.each { |k, v| ENV[k] = v }
    results = []
    error = nil
    exit_code = 0
    begin
      value = CELL_BINDING.eval(code, "(cell)", 1)
      results << { "data" => { "text/plain" => value.inspect }, "is_main_result" => true } unless value.nil?
    rescue SystemExit => e
      exit_code = e.status
    rescue Exception => e
      trace = (e.backtrace || []).select { |line| line.start_with?("(cell)") }
      error = {
        "name" => e.class.name,
        "value" => e.message,
        "traceback" => (["#{e.class}: #{e.message}"] + trace.map { |l| "\tfrom #{l}" }).join("\n"),
      }
      exit_code = 1
    ensure
      $stdout.flush
      $stderr.flush
      saved_env.each { |k, v| ENV[k] = v }
    end
    JSON.generate({ "results" => results, "error" => error, "exit_code" => exit_code })
  end
end

$stdout.sync = true
$stderr.sync = true
Dir.chdir("/home/user")
