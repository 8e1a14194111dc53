#compdef staging-cli

_staging_cli_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _STAGING_CLI_COMPLETE=complete_zsh staging-cli)
}

compdef _staging_cli_completion staging-cli