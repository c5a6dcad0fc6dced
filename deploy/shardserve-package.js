'use strict';
// Serverless Framework v3 local plugin: `serverless package` and `deploy` build each function's
// artifact with `shardserve package` (docs/serverless.md), so what ships is self-contained.
// Functions opt in under custom.shardserve.functions; their package.artifact must be
// <out>/<function>.zip. `serverless offline` runs the code in its directory, never the zips.
// SnapStart exists for python3.12 and later only: on an older Python runtime (for instance
// SHARDSERVE_LAMBDA_RUNTIME=python3.11, as the tests build for the local Python) every
// function's snapStart is switched off, with a warning, before any command uses it.
const { spawnSync } = require('child_process');
const path = require('path');

const SNAPSTART_PYTHON = [3, 12];

// [major, minor] of a `pythonX.Y` runtime; null for any other runtime (java21...).
function pythonVersion(runtime) {
  const match = /^python(\d+)\.(\d+)$/.exec(String(runtime || ''));
  return match ? [Number(match[1]), Number(match[2])] : null;
}

function snapStartSupported(runtime) {
  const version = pythonVersion(runtime);
  if (!version) return true; // not Python: AWS decides (Java and .NET have their own rules)
  return version[0] > SNAPSTART_PYTHON[0]
    || (version[0] === SNAPSTART_PYTHON[0] && version[1] >= SNAPSTART_PYTHON[1]);
}

class ShardservePackage {
  constructor(serverless, options, utils) {
    this.serverless = serverless;
    this.options = options || {};
    this.log = (utils && utils.log) || null;
    this.hooks = {
      initialize: () => this.checkSnapStart(),
      'before:package:createDeploymentArtifacts': () => this.build(),
      'before:deploy:function:packageFunction': () => this.build([this.options.function]),
      'before:offline:start:init': () => this.runCodeInPlace(),
      'before:offline:start': () => this.runCodeInPlace(),
    };
  }

  warn(message) {
    if (this.log) this.log.warning(message);
    else this.serverless.cli.log(`Warning: ${message}`);
  }

  // Switch SnapStart off for functions whose runtime has none, saying so: CloudFormation
  // would refuse the stack only at deploy time, and a local package would claim a SnapStart
  // it cannot have. Returns the names of the functions it switched off.
  checkSnapStart() {
    const provider = this.serverless.service.provider || {};
    const off = [];
    for (const [name, fn] of Object.entries(this.serverless.service.functions || {})) {
      if (!fn || !fn.snapStart) continue;
      const runtime = fn.runtime || provider.runtime;
      if (snapStartSupported(runtime)) continue;
      delete fn.snapStart;
      off.push(name);
      this.warn(`function ${name}: SnapStart switched off: runtime ${runtime} has no SnapStart `
        + `(python${SNAPSTART_PYTHON.join('.')} or later); set provider.runtime `
        + '(SHARDSERVE_LAMBDA_RUNTIME) to python3.12+ to keep it');
    }
    return off;
  }

  settings() {
    const custom = this.serverless.service.custom || {};
    return { out: 'build/lambda', command: 'shardserve', functions: {}, ...(custom.shardserve || {}) };
  }

  selected(only) {
    const { functions } = this.settings();
    return Object.entries(this.serverless.service.functions || {})
      .filter(([name]) => name in functions && (!only || only.includes(name)));
  }

  build(only) {
    const settings = this.settings();
    const provider = this.serverless.service.provider;
    const args = ['package', '--runtime', String(provider.runtime),
      '--architecture', String(provider.architecture || 'x86_64'), '--out', settings.out];
    if (settings.repository) args.push('--repository', String(settings.repository));
    for (const dist of settings.extra || []) args.push('--extra', String(dist));
    const selected = this.selected(only);
    if (selected.length === 0) return;
    for (const [name, fn] of selected) {
      const want = path.join(settings.out, `${name}.zip`);
      const artifact = fn.package && fn.package.artifact;
      if (!artifact || path.normalize(artifact) !== path.normalize(want)) {
        throw new this.serverless.classes.Error(
          `function ${name}: set package.artifact to ${want} (shardserve package writes it)`);
      }
      const models = settings.functions[name] || [];
      args.push(models.length ? `${name}=${models.join(',')}` : name);
    }
    const result = spawnSync(settings.command, args, {
      cwd: this.serverless.serviceDir, stdio: 'inherit', shell: false,
    });
    if (result.error || result.status !== 0) {
      throw new this.serverless.classes.Error(
        `shardserve package failed (${result.error ? result.error.message : `exit ${result.status}`})`);
    }
  }

  runCodeInPlace() {
    // serverless-offline's Python runner imports the handler from its working directory and
    // ignores artifacts; unzipping them would only cost time (and fail when none is built).
    for (const [, fn] of this.selected()) {
      if (fn.package) delete fn.package.artifact;
    }
  }
}

module.exports = ShardservePackage;
module.exports.snapStartSupported = snapStartSupported;
