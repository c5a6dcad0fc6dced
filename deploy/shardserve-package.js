'use strict';
// Serverless Framework v3 local plugin: `serverless package` and `deploy` build each function's
// artifact with `shardserve package` (docs/serverless.md), so what ships is self-contained.
// Functions opt in under custom.shardserve.functions; their package.artifact must be
// <out>/<function>.zip. `serverless offline` runs the code in its directory, never the zips.
const { spawnSync } = require('child_process');
const path = require('path');

class ShardservePackage {
  constructor(serverless, options) {
    this.serverless = serverless;
    this.options = options || {};
    this.hooks = {
      'before:package:createDeploymentArtifacts': () => this.build(),
      'before:deploy:function:packageFunction': () => this.build([this.options.function]),
      'before:offline:start:init': () => this.runCodeInPlace(),
      'before:offline:start': () => this.runCodeInPlace(),
    };
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
