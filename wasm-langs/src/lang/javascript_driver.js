// The SoulBox kernel driver for QuickJS, evaluated once when the pack is pre-initialised.
// Cells are evaluated by the host as global scripts (so `let` and `const` persist); the host
// then stores the cell's value or exception in `globalThis.__soulbox_value` and asks this
// driver to describe it as JSON.
(() => {
  const inspect = (value, depth = 0) => {
    if (typeof value === "string") return depth === 0 ? value : JSON.stringify(value);
    if (typeof value === "function") return `[Function: ${value.name || "anonymous"}]`;
    if (typeof value === "symbol" || typeof value === "bigint") return String(value) + (typeof value === "bigint" ? "n" : "");
    if (value === null || typeof value !== "object") return String(value);
    if (value instanceof Error) return value.stack ? `${value}\n${value.stack}` : String(value);
    if (depth > 2) return Array.isArray(value) ? "[Array]" : "[Object]";
    if (Array.isArray(value)) return `[ ${value.map((v) => inspect(v, depth + 1)).join(", ")} ]`;
    if (value instanceof Map) return `Map(${value.size}) { ${[...value].map(([k, v]) => `${inspect(k, depth + 1)} => ${inspect(v, depth + 1)}`).join(", ")} }`;
    if (value instanceof Set) return `Set(${value.size}) { ${[...value].map((v) => inspect(v, depth + 1)).join(", ")} }`;
    if (value instanceof Promise) return "Promise { <pending> }";
    const entries = Object.keys(value).map((k) => `${k}: ${inspect(value[k], depth + 1)}`);
    return entries.length ? `{ ${entries.join(", ")} }` : "{}";
  };
  // Math.random is seeded per kernel by the host (xorshift128+), since the engine's own seed
  // is frozen into the pre-initialised image that every sandbox starts from.
  let s0 = 1n, s1 = 2n;
  const mask = (1n << 64n) - 1n;
  Math.random = () => {
    let x = s0, y = s1;
    s0 = y;
    x = (x ^ (x << 23n)) & mask;
    s1 = x ^ y ^ (x >> 17n) ^ (y >> 26n);
    return Number(((s1 + y) & mask) >> 11n) / 2 ** 53;
  };
  // console formats its arguments as Node does. QuickJS without its std module has no stderr,
  // so warnings and errors go to stdout too.
  const write = console.log;
  const format = (...args) => args.map((a) => inspect(a)).join(" ");
  for (const name of ["log", "info", "debug", "warn", "error"]) {
    console[name] = (...args) => write(format(...args));
  }
  globalThis.process = { env: {} };
  globalThis.__soulbox = {
    begin(env, seed) {
      // The cell's variables hold for this cell only.
      globalThis.process.env = Object.assign({}, env);
      if (seed !== null) {
        s0 = BigInt(seed[0]) | 1n;
        s1 = BigInt(seed[1]);
      }
    },
    result() {
      const value = globalThis.__soulbox_value;
      globalThis.__soulbox_value = undefined;
      if (value === undefined) return "null";
      return JSON.stringify({ "text/plain": inspect(value) });
    },
    error() {
      const e = globalThis.__soulbox_value;
      globalThis.__soulbox_value = undefined;
      const isError = e instanceof Error;
      return JSON.stringify({
        name: isError ? e.name : typeof e,
        value: isError ? e.message : inspect(e),
        traceback: isError ? `${e.name}: ${e.message}\n${e.stack || ""}` : `Uncaught ${inspect(e)}`,
      });
    },
  };
})();
